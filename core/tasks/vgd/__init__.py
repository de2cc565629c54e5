"""Visual grounding on RefCOCO, RefCOCO+, RefCOCOg: data, head, losses, Acc@0.5.

Targets are built per batch on the device from the proposals and the ground-truth box:
proposals with IoU >= 0.5 are positives, their scores target their IoU normalised to 1
(KL-divergence on the log-softmax over the real, unpadded proposals — the original also
soft-maxed over padding), their boxes the normalised Faster R-CNN deltas (smooth-L1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from core.data.features import open_features, pad_regions
from core.data.text import cached_vocab_and_vectors, encode
from core.model import AttFlat, region_padding
from core.ops import LayerNorm
from core.tasks.base import Task, entries_of, unwrap_subset
from core.tasks.vgd.boxes import area, clip_boxes, decode_deltas, encode_deltas, iou, xywh_to_xyxy
from utils.io import atomic_write_json, expect_fields, read_json

SPLITS = {"refcoco": ("train", "val", "testA", "testB"),
          "refcoco+": ("train", "val", "testA", "testB"),
          "refcocog": ("train", "val", "test"),
          "demo": ("train", "val", "testA", "testB")}
ENTRY_FIELDS = {"tokens": list, "image_id": int, "bbox": list, "height": int, "width": int}
POSITIVE_IOU = 0.5
# COCO train2014 images, named like the VQA files; the original also found '<id>.npz'.
FEATURE_NAMES = ("*_{id:012d}.jpg.npz", "{id}.npz")


class VGDDataset(Dataset):
    def __init__(self, entries: list[dict], feats, vocab, cfg):
        self.entries, self.feats, self.vocab = entries, feats, vocab
        self.max_token, self.regions = cfg.MAX_TOKEN, cfg.MAX_REGIONS

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        img, boxes, _ = self.feats.load(e["image_id"], self.regions)
        if len(img) < self.regions:
            raise ValueError(f"{self.feats.paths[e['image_id']]}: {len(img)} boxes, expected "
                             f"{self.regions} (MAX_REGIONS; grounding features have a fixed "
                             f"number of proposals)")
        return {"txt": encode(e["tokens"], self.vocab, self.max_token, rule="tokens"), "img": img,
                "boxes": boxes, "gt": np.asarray(e["bbox"], np.float32),
                "size": np.asarray([e["height"], e["width"]], np.float32),
                "sent_id": e.get("sent_id", i)}


class VGDHead(nn.Module):
    """Text AttFlat [B, 1, 2H] + per-region Linear(H -> 2H), LayerNorm, score and box."""

    def __init__(self, cfg):
        super().__init__()
        out = 2 * cfg.HSIZE
        self.attflat_lang = AttFlat(cfg.HSIZE, cfg.FLAT_MLP_SIZE, cfg.FLAT_GLIMPSES, out,
                                    cfg.DROPOUT_R)
        self.linear_img = nn.Linear(cfg.HSIZE, out)
        self.proj_norm = LayerNorm(out)
        self.linear_score = nn.Linear(out, 1)
        self.linear_reg = nn.Linear(out, 4)

    def forward(self, txt, txt_mask, img, img_mask):
        fused = self.proj_norm(self.attflat_lang(txt, txt_mask)[:, None] + self.linear_img(img))
        return self.linear_score(fused).squeeze(-1), self.linear_reg(fused)


class VGDTask(Task):
    name = "vgd"
    headline = "acc"
    datasets = tuple(SPLITS)
    batch_ids = ("sent_id", "sent ids")
    # full_vgd.py: x is the text (encoder), y the image regions (decoder)
    original_key_prefixes = (("attflat_x.", "head.attflat_lang."),
                             ("attfc_y.", "head.linear_img."),
                             ("proj_norm.", "head.proj_norm."),
                             ("proj_scores.", "head.linear_score."),
                             ("proj_reg.", "head.linear_reg."))

    @property
    def root(self) -> Path:
        return self.data_paths.text / self.cfg.DATASET

    def _split_file(self, split: str) -> Path:
        if split not in SPLITS[self.cfg.DATASET]:
            raise ValueError(f"unknown {self.cfg.DATASET} split {split!r}; valid: "
                             f"{', '.join(SPLITS[self.cfg.DATASET])}")
        return self.root / f"{split}.json"

    def prepare(self, word_vectors: bool = True) -> None:
        files = [self._split_file(s) for s in SPLITS[self.cfg.DATASET]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no {missing[0]}: preprocess the refer toolkit's files "
                                    f"with preprocess_vgd.py (see dataset_setup.md)")

        # The original's vocabulary: every split's sentences in the order above (train first),
        # the refer toolkit's tokens taken as given, not re-tokenised.
        def token_lists():
            for f in files:
                for e in _entries(f):
                    yield e["tokens"]

        self.vocab, self.word_vectors = cached_vocab_and_vectors(
            self.root / "cache", files, token_lists, self.word_vector_source(word_vectors),
            self.cfg.WORD_EMBED_SIZE, self.log, rule="tokens")

    def dataset(self, split: str) -> VGDDataset:
        entries, needed = [], {}
        for part in split.split("+"):
            path = self._split_file(part)
            part_entries = _entries(path)
            if self.cfg.SUBSET:
                part_entries = part_entries[:self.cfg.SUBSET]
            for i, e in enumerate(part_entries):
                _check_box(path, i, e)
                needed.setdefault(e["image_id"], f"{path.name}[{i}] (sent_id "
                                                 f"{e.get('sent_id', '?')})")
            entries += part_entries
        feats = open_features([self.data_paths.features], self.cfg.IMG_FEAT_SIZE,
                              FEATURE_NAMES)
        feats.check(needed)
        return VGDDataset(entries, feats, self.vocab, self.cfg)

    def collate(self, samples: list[dict]) -> dict:
        stack = lambda key: torch.from_numpy(np.stack([s[key] for s in samples]))  # noqa: E731
        return {"txt": stack("txt"),
                "img": torch.from_numpy(pad_regions([s["img"] for s in samples],
                                                    self.cfg.IMG_FEAT_SIZE)),
                "boxes": torch.from_numpy(pad_regions([s["boxes"] for s in samples], 4)),
                "gt": xywh_to_xyxy(stack("gt")), "size": stack("size"),
                "sent_id": [s["sent_id"] for s in samples]}

    # --- model -------------------------------------------------------------------------
    def build_head(self) -> nn.Module:
        return VGDHead(self.cfg)

    def loss(self, out, batch):
        scores, deltas = out
        pad = region_padding(batch["img"])
        overlap = iou(batch["boxes"], batch["gt"][:, None])[..., 0].masked_fill(pad, 0.0)
        positive = overlap >= POSITIVE_IOU
        n_pos = positive.sum().clamp(min=1)
        has_pos = positive.any(-1)
        target = torch.where(positive, overlap, torch.zeros_like(overlap))
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-9)
        log_p = F.log_softmax(scores.masked_fill(pad, -1e9), -1)
        kl = F.kl_div(log_p[has_pos], target[has_pos], reduction="sum")
        reg_target = encode_deltas(batch["boxes"], batch["gt"][:, None].expand_as(batch["boxes"]))
        reg = F.smooth_l1_loss(deltas[positive], reg_target[positive], reduction="sum")
        return (kl + 0.5 * reg) / n_pos

    # --- evaluation --------------------------------------------------------------------
    def predict(self, out, batch) -> list[dict]:
        scores, deltas = out
        pad = region_padding(batch["img"])
        best = scores.masked_fill(pad, -1e9).argmax(-1)
        rows = torch.arange(len(best), device=best.device)
        box = decode_deltas(batch["boxes"][rows, best], deltas[rows, best])
        box = clip_boxes(box, batch["size"][:, 0], batch["size"][:, 1])
        hit = iou(box[:, None], batch["gt"][:, None])[:, 0, 0] >= POSITIVE_IOU
        prob = torch.softmax(scores.masked_fill(pad, -1e9), -1)[rows, best]
        return [{"sent_id": s, "box": b, "score": p, "correct": bool(c)} for s, b, p, c in
                zip(batch["sent_id"], box.tolist(), prob.tolist(), hit.tolist())]

    def metric(self, predictions, dataset) -> dict:
        if not predictions:
            return {}
        return {"acc": 100.0 * sum(p["correct"] for p in predictions) / len(predictions),
                "n": len(predictions)}

    def write_predictions(self, predictions, folder: Path, split: str) -> Path:
        path = folder / f"result_{split}.json"
        atomic_write_json(path, predictions)
        return path

    def baseline(self, train, evaluated) -> dict:
        """Acc@0.5 of a random and of the largest real proposal (on 2,000 sentences at most)."""
        entries, feats = entries_of(evaluated)[:2000], unwrap_subset(evaluated)[0].feats
        proposals = {i: feats.load(i, self.cfg.MAX_REGIONS)[1]
                     for i in {e["image_id"] for e in entries}}
        rand, largest = proposal_baselines(entries, proposals)
        return {"random_proposal_acc": rand, "largest_proposal_acc": largest}

    def attention_reading(self, output, batch, att):
        """The predicted and the true box; regions weighted by the grounding score (the head
        has no image attention pooling)."""
        scores, _ = output
        pad = batch["img"].abs().sum(-1) == 0
        regions = torch.softmax(scores.float().masked_fill(pad, -1e9), -1)[0].numpy()
        pred = self.predict(output, batch)[0]
        true = batch["gt"][0].tolist()
        overlap = float(iou(torch.tensor([pred["box"]]), torch.tensor([true]))[0, 0])
        lines = [f"predicted box score {pred['score']:.3f}", f"IoU with true {overlap:.3f}",
                 "correct (IoU >= 0.5)" if pred["correct"] else "wrong (IoU < 0.5)"]
        return lines, {"predicted": (pred["box"], "#2ca02c"), "true": (true, "#d62728")}, regions


def proposal_baselines(entries: list[dict], proposals: dict) -> tuple[float, float]:
    """(random-proposal, largest-proposal) Acc@0.5 in percent over ``entries``.

    Random is the expectation: the fraction of an image's proposals with IoU >= 0.5 with the
    ground truth, averaged over sentences. ``proposals`` maps an image id to its [K, 4]
    x1 y1 x2 y2 boxes.
    """
    if not entries:
        return 0.0, 0.0
    rand, largest = [], []
    for e in entries:
        boxes = torch.as_tensor(np.asarray(proposals[e["image_id"]]), dtype=torch.float64)
        gt = xywh_to_xyxy(torch.tensor([e["bbox"]], dtype=torch.float64))
        hit = iou(boxes, gt)[:, 0] >= POSITIVE_IOU
        rand.append(hit.double().mean().item())
        largest.append(float(hit[int(area(boxes).argmax())]))
    return 100.0 * float(np.mean(rand)), 100.0 * float(np.mean(largest))


def _entries(path: Path) -> list[dict]:
    data = read_json(path, "grounding split")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of sentence entries (preprocess_vgd.py "
                         f"writes them)")
    for i, e in enumerate(data):
        expect_fields(path, f"[{i}]", e, ENTRY_FIELDS)
        if not all(isinstance(t, str) for t in e["tokens"]):
            raise ValueError(f"{path}: [{i}].tokens is {e['tokens']!r}, expected a list of "
                             f"words (strings)")
    return data


def _check_box(path: Path, i: int, e: dict) -> None:
    x, y, w, h = e["bbox"]
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > e["width"] + 1 or y + h > e["height"] + 1:
        raise ValueError(f"{path}: [{i}] (image {e['image_id']}) bbox {e['bbox']} lies outside "
                         f"its {e['width']}x{e['height']} image (expected [x, y, w, h] inside)")
