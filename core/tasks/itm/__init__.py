"""Image–text matching on Flickr30K: data, hard negatives, loss, fast retrieval evaluation.

Training sample = a caption with its image, one hard negative caption (of the image) and one
hard negative image (of the caption); the three pairs are scored in one forward and trained
with BCE, each caption's text side and each image's side computed once (``collate``). Hard negatives are re-mined before every epoch: for every image 64 random captions
and for every caption 64 random images are scored with the current network, the top 5 kept,
and each sample draws one of the five (from its own seeded generator, never the global RNG).

Scoring many pairs (mining, the evaluation matrix) does the pair-independent work once: an
image's regions are projected once per group of pairs, a caption's text side (embedding,
LSTM and — when no encoder block reads the image — the encoder) once, and only the decoder
and head run per pair.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from core.data.features import open_features, pad_regions
from core.tasks.itm.flickr import SPLITS, feature_key, file_names, read_id_mapping, read_lines, read_split
from core.data.text import cached_vocab_and_vectors, encode
from core.model import PooledFusionHead, Side
from core.tasks.base import Task, unwrap_subset
from utils import dist
from utils.io import atomic_write
from core.tasks.itm.retrieval import chance_r1, retrieval_metrics

MAPPING_FILES = ("id_mapping.json", "dataset_flickr30k.json")
MARGIN = 0.2               # ITM_LOSS = margin: the original's hinge margin
IMAGE_GROUP = 16            # images whose regions are projected together when scoring pairs
TEXT_CACHE_BYTES = 2**30    # encoded captions kept for a whole scoring pass up to this size
# Named after the Flickr image file (1000092795.jpg.npz); the original also found '<id>.npz'.
FEATURE_NAMES = ("{id}.jpg.npz", "{id}.npz")


class ITMDataset(Dataset):
    """Captions (the samples) of a split, their images' features, and mined negatives."""

    def __init__(self, captions: np.ndarray, caption_image: np.ndarray, keys: list[int],
                 feats, cfg):
        self.tokens, self.caption_image, self.keys, self.feats = captions, caption_image, keys, feats
        self.regions = cfg.MAX_REGIONS
        self.seed, self.epoch = cfg.SEED, 0
        self.neg_captions: np.ndarray | None = None     # [n_images, top-k] caption indices
        self.neg_images: np.ndarray | None = None       # [n_captions, top-k] image indices

    def __len__(self):
        return len(self.tokens)

    @property
    def n_images(self) -> int:
        return len(self.keys)

    def image(self, i: int):
        img, boxes, _ = self.feats.load(self.keys[i], self.regions)
        if len(img) != self.regions:
            raise ValueError(f"{self.feats.paths[self.keys[i]]}: {len(img)} boxes, expected "
                             f"{self.regions} (MAX_REGIONS; Flickr30K features have 36)")
        return img, boxes

    def set_negatives(self, neg_captions, neg_images, epoch: int) -> None:
        self.neg_captions, self.neg_images, self.epoch = neg_captions, neg_images, epoch

    def __getitem__(self, j):
        i = int(self.caption_image[j])
        img, boxes = self.image(i)
        item = {"txt": self.tokens[j], "img": img, "boxes": boxes, "caption_id": int(j)}
        if self.neg_captions is not None:
            rng = np.random.default_rng([self.seed, self.epoch, j])
            item["neg_txt"] = self.tokens[self.neg_captions[i, rng.integers(self.neg_captions.shape[1])]]
            item["neg_img"], item["neg_boxes"] = self.image(
                int(self.neg_images[j, rng.integers(self.neg_images.shape[1])]))
        return item


class ITMHead(PooledFusionHead):
    """The pooled fusion head (shared with VQA) with one output: the matching logit."""

    def __init__(self, cfg):
        super().__init__(cfg, 1)

    def forward(self, txt, txt_mask, img, img_mask):
        return super().forward(txt, txt_mask, img, img_mask).squeeze(-1)


class ITMTask(Task):
    name = "itm"
    headline = "rsum"
    datasets = ("flickr", "demo")
    batch_ids = ("caption_id", "caption indices (with their negatives)")
    original_key_prefixes = PooledFusionHead.ORIGINAL_KEY_PREFIXES      # the same head

    @property
    def root(self) -> Path:
        return self.data_paths.text

    def _mapping(self) -> dict[int, str]:
        for name in MAPPING_FILES:
            if (self.root / name).is_file():
                return read_id_mapping(self.root / name)
        raise FileNotFoundError(f"no image id mapping in {self.root}: expected one of "
                                f"{', '.join(MAPPING_FILES)} (see dataset_setup.md)")

    def _split(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown Flickr30K split {split!r}; valid: {', '.join(SPLITS)}")
        return read_split(self.root / "f30k_precomp", split)

    def prepare(self, word_vectors: bool = True) -> None:
        files = [self.root / "f30k_precomp" / f"{s}_caps.txt" for s in SPLITS]
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"no caption files in {self.root / 'f30k_precomp'} "
                                    f"(expected train_caps.txt, dev_caps.txt, test_caps.txt)")

        def texts():            # decoded as the captions of the datasets are (UTF-8)
            for f in files:
                yield from read_lines(f, "captions")

        self.vocab, self.word_vectors = cached_vocab_and_vectors(
            self.root / "cache", files, texts, self.word_vector_source(word_vectors),
            self.cfg.WORD_EMBED_SIZE, self.log)
        self.mapping = self._mapping()

    def dataset(self, split: str) -> ITMDataset:
        if "+" in split:
            raise ValueError(f"ITM trains on one split at a time, got {split!r}")
        data = self._split(split)
        n_images = len(data.image_ids)
        if self.cfg.SUBSET:                      # ITM: the first SUBSET images
            n_images = min(n_images, self.cfg.SUBSET)
        keep = np.flatnonzero(data.caption_image < n_images)
        names = file_names(data, self.mapping)[:n_images]
        keys = [feature_key(n) for n in names]
        feats = open_features([self.data_paths.features], self.cfg.IMG_FEAT_SIZE,
                              FEATURE_NAMES)
        feats.check({k: f"image {n} of {split}" for k, n in zip(keys, names)})
        tokens = np.stack([encode(data.captions[j], self.vocab, self.cfg.MAX_TOKEN) for j in keep])
        return ITMDataset(tokens, data.caption_image[keep], keys, feats, self.cfg)

    def collate(self, samples: list[dict]) -> dict:
        """Positive, negative-caption and negative-image pairs, in that order (3n pairs for
        n samples with negatives): ``txt`` holds the n captions then the n negative captions,
        ``img``/``boxes`` the n images then the n negative images, each once, and
        ``txt_rows``/``img_rows`` which of them each pair reads (see ``Net.forward``)."""
        txt = [s["txt"] for s in samples]
        img = [s["img"] for s in samples]
        boxes = [s["boxes"] for s in samples]
        n = len(samples)
        target = [1.0] * n
        rows = {}
        if "neg_txt" in samples[0]:
            txt += [s["neg_txt"] for s in samples]
            img += [s["neg_img"] for s in samples]
            boxes += [s["neg_boxes"] for s in samples]
            own, other = torch.arange(n), torch.arange(n, 2 * n)
            rows = {"txt_rows": torch.cat([own, other, own]),
                    "img_rows": torch.cat([own, own, other])}
            target += [0.0] * (2 * n)
        pos_weight = 2.0 if self.cfg.ITM_POS_TWICE else 1.0
        return {"txt": torch.from_numpy(np.stack(txt)),
                "img": torch.from_numpy(pad_regions(img, self.cfg.IMG_FEAT_SIZE)),
                "boxes": torch.from_numpy(pad_regions(boxes, 4)), **rows,
                "target": torch.tensor(target),
                "weight": torch.tensor([pos_weight] * n + [1.0] * (len(target) - n)),
                "caption_id": [s["caption_id"] for s in samples]}

    def pairs_in(self, batch: dict) -> int:
        return len(batch["target"])

    # --- model -------------------------------------------------------------------------
    def build_head(self) -> nn.Module:
        return ITMHead(self.cfg)

    def loss(self, out, batch):
        """BCE of the positive (counted twice by default, as the original), the negative
        caption and the negative image, summed; or (ITM_LOSS = margin) the hinge of each
        negative's matching probability against the positive's, summed."""
        if self.cfg.ITM_LOSS == "margin":
            pos, neg_caption, neg_image = torch.sigmoid(out).chunk(3)
            return ((MARGIN + neg_caption - pos).clamp(min=0).sum()
                    + (MARGIN + neg_image - pos).clamp(min=0).sum())
        return F.binary_cross_entropy_with_logits(out, batch["target"], weight=batch["weight"],
                                                  reduction="sum")

    # --- hard negatives ----------------------------------------------------------------
    def start_epoch(self, net, dataset, epoch: int, device) -> None:
        ds = unwrap_subset(dataset)[0]
        hard = epoch >= self.cfg.ITM_HARD_NEG_EPOCH     # before it: random negatives

        def score(pair_img, pair_cap):
            return score_pairs(net, ds, pair_img, pair_cap, device, self.cfg.eval_batch_size(),
                               desc=f"mining negatives (epoch {epoch + 1})")

        neg_captions, neg_images = mine_negatives(
            score if hard else None, ds.caption_image, ds.n_images,
            self.cfg.ITM_NEG_CANDIDATES if hard else self.cfg.ITM_NEG_TOPK,
            self.cfg.ITM_NEG_TOPK, [self.cfg.SEED, epoch])
        ds.set_negatives(neg_captions, neg_images, epoch)

    # --- evaluation --------------------------------------------------------------------
    def evaluate(self, net, dataset, device, desc: str):
        """Score every image of ``dataset`` against every caption of it (a search's
        architecture split: its captions and their images)."""
        ds, caps = unwrap_subset(dataset)
        images, caption_image = np.unique(ds.caption_image[caps], return_inverse=True)
        img = np.repeat(images, len(caps))
        cap = np.tile(caps, len(images))
        scores = score_pairs(net, ds, img, cap, device, self.cfg.eval_batch_size(),
                             desc=f"{desc}: {len(images)} x {len(caps)} pairs")
        scores = scores.reshape(len(images), len(caps))
        return retrieval_metrics(scores, caption_image), scores

    def metric(self, predictions, dataset) -> dict:
        ds, caps = unwrap_subset(dataset)
        return retrieval_metrics(predictions,
                                 np.unique(ds.caption_image[caps], return_inverse=True)[1])

    def write_predictions(self, predictions, folder: Path, split: str) -> Path:
        path = folder / f"scores_{split}.npy"
        atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), predictions.astype(np.float32)))
        return path

    def baseline(self, train, evaluated) -> dict:
        ds, caps = unwrap_subset(evaluated)
        return chance_r1(np.unique(ds.caption_image[caps], return_counts=True)[1])

    def attention_reading(self, output, batch, att):
        """The matching score of the pair."""
        score = float(torch.sigmoid(output.float().reshape(-1)[0]))
        return [f"matching score {score:.3f}", "(sigmoid of the logit)"], {}, att["img"][0].numpy()


# ---- scoring many pairs ------------------------------------------------------------------

@torch.no_grad()
def score_pairs(net, ds: ITMDataset, pair_img: np.ndarray, pair_cap: np.ndarray, device,
                batch: int, desc: str = "scoring pairs") -> np.ndarray:
    """Matching probabilities of (image, caption) pairs, in the given order.

    Pairs are grouped by image: a group's regions are read and projected once; each
    caption's text side is computed once (see ``_TextSides``); only the decoder and the
    head run per pair.
    """
    was_training = net.training
    net.eval()
    out = np.empty(len(pair_img), np.float32)
    order = np.argsort(pair_img, kind="stable")
    images = np.unique(pair_img)
    starts = np.searchsorted(pair_img[order], images)
    texts = _TextSides(net, ds, np.unique(pair_cap), device, batch)
    bar = tqdm(total=len(order), desc=desc, leave=False, dynamic_ncols=True, unit="pair",
               disable=not dist.is_main())
    for g in range(0, len(images), IMAGE_GROUP):
        group = images[g:g + IMAGE_GROUP]
        lo = starts[g]
        hi = starts[g + IMAGE_GROUP] if g + IMAGE_GROUP < len(images) else len(order)
        feats, boxes = zip(*(ds.image(int(i)) for i in group))
        img = net.image_side(torch.from_numpy(np.stack(feats)).to(device),
                             torch.from_numpy(np.stack(boxes)).to(device))
        local = {int(i): n for n, i in enumerate(group)}
        for s in range(lo, hi, batch):
            idx = order[s:min(s + batch, hi)]
            rows = torch.tensor([local[int(i)] for i in pair_img[idx]], device=device)
            txt, encoded = texts.get(pair_cap[idx])
            logits = net.fuse(txt, img.take(rows), encoded=encoded)
            out[idx] = torch.sigmoid(logits.float()).cpu().numpy()
            bar.update(len(idx))
    bar.close()
    net.train(was_training)
    return out


class _TextSides:
    """Text sides of captions for pair scoring.

    When no encoder block reads the image, the encoded text depends on the caption alone:
    every caption is encoded once for the whole pass (if that fits TEXT_CACHE_BYTES),
    otherwise once per batch of pairs. When the encoder reads the image, the encoder runs
    per pair, inside ``fuse``.
    """

    def __init__(self, net, ds, captions: np.ndarray, device, batch: int):
        self.net, self.ds, self.device = net, ds, device
        self.text_only = not net.backbone.encoder_reads_image
        self.captions, self.cache = captions, None
        size = len(captions) * ds.tokens.shape[1] * net.lstm.hidden_size * 4
        if self.text_only and size <= TEXT_CACHE_BYTES:
            parts = [self._encode(captions[s:s + batch]) for s in range(0, len(captions), batch)]
            self.cache = Side(torch.cat([p.x for p in parts]), torch.cat([p.mask for p in parts]))

    def _encode(self, caps: np.ndarray) -> Side:
        side = self.net.text_side(torch.from_numpy(self.ds.tokens[caps]).to(self.device))
        return self.net.shared_text(side)[0]

    def get(self, caps: np.ndarray) -> tuple[Side, bool]:
        """(text sides of ``caps``, whether they are already encoded)."""
        if self.cache is not None:
            rows = torch.from_numpy(np.searchsorted(self.captions, caps)).to(self.device)
            return self.cache.take(rows), True
        unique, inverse = np.unique(caps, return_inverse=True)
        return self._encode(unique).take(torch.from_numpy(inverse).to(self.device)), \
            self.text_only


def mine_negatives(score, caption_image: np.ndarray, n_img: int, candidates: int, top_k: int,
                   seed) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``candidates`` random captions per image and random images per caption.

    ``score(pair_img, pair_cap)`` returns the matching scores of index pairs; both
    directions are scored in one call, so each image's regions are read once. With
    ``score=None`` nothing is scored: the first ``top_k`` random candidates are kept
    (random negatives).
    Returns ([n_img, top_k] caption indices, [n_captions, top_k] image indices).
    """
    rng = np.random.default_rng(seed)
    n_cap = len(caption_image)
    cand_caps = _draw_excluding(rng, n_img, n_cap, candidates,
                                lambda rows, draws: caption_image[draws] == rows[:, None])
    cand_imgs = _draw_excluding(rng, n_cap, n_img, candidates,
                                lambda rows, draws: draws == caption_image[rows][:, None])
    if score is None:
        return cand_caps[:, :top_k], cand_imgs[:, :top_k]
    pair_img = np.concatenate([np.repeat(np.arange(n_img), candidates), cand_imgs.ravel()])
    pair_cap = np.concatenate([cand_caps.ravel(), np.repeat(np.arange(n_cap), candidates)])
    scores = score(pair_img, pair_cap)
    cap_scores = scores[:n_img * candidates].reshape(n_img, candidates)
    img_scores = scores[n_img * candidates:].reshape(n_cap, candidates)
    return _top(cand_caps, cap_scores, top_k), _top(cand_imgs, img_scores, top_k)


def _draw_excluding(rng, rows: int, pool: int, n: int, is_positive) -> np.ndarray:
    """``n`` random pool indices per row, redrawn where they hit the row's positives."""
    draws = rng.integers(pool, size=(rows, n))
    for _ in range(100):
        bad = is_positive(np.arange(rows), draws)
        if not bad.any():
            break
        draws[bad] = rng.integers(pool, size=int(bad.sum()))
    return draws


def _top(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, best, 1)
