"""Backbone (encoder over text, decoder over image regions) and the network around it.

The same ``Backbone`` class holds fixed operators (a trained architecture) or ``MixedOp``
blocks (the search supernet).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.arch import Arch
from core.mixed import MixedOp
from core.ops import MLP, LayerNorm, OpSpec, build_op
from core.relations import image_relation, text_relation


@dataclass
class Side:
    """One modality ready for the blocks: features [B, N, H], mask [B, 1, 1, N] (True =
    padding) and, when some block needs it, the embedded relations [B, N, N, REL_SIZE]."""
    x: torch.Tensor
    mask: torch.Tensor
    rel: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> "Side":
        """The sides of ``rows`` (a sequence may be taken several times)."""
        return Side(self.x[rows], self.mask[rows], None if self.rel is None else self.rel[rows])


class Backbone(nn.Module):
    """Encoder blocks over the text (``enc_list``), decoder blocks over the image
    (``dec_list``), guided by the encoded text."""

    def __init__(self, enc: list[nn.Module], dec: list[nn.Module], rel_size: int):
        super().__init__()
        self.enc_list = nn.ModuleList(enc)
        self.dec_list = nn.ModuleList(dec)
        # Shared relation embedding, Linear(4 -> REL_SIZE) + ReLU; built only when used.
        self.linear_rel_img = nn.Linear(4, rel_size) if _uses(dec, "uses_rel") else None
        self.linear_rel_txt = nn.Linear(3, rel_size) if _uses(enc, "uses_rel") else None

    @property
    def encoder_reads_image(self) -> bool:
        """False when the encoded text depends on the text alone (it can then be cached)."""
        return _uses(self.enc_list, "uses_y")

    def embed_relation(self, raw: torch.Tensor, side: str) -> torch.Tensor:
        linear = self.linear_rel_txt if side == "txt" else self.linear_rel_img
        return torch.relu(linear(raw))

    def encode(self, txt: Side, img: Side | None) -> Side:
        x = txt.x
        for block in self.enc_list:
            x = block(x, txt.mask, img.x if img else None, img.mask if img else None, txt.rel)
        return Side(x, txt.mask)

    def decode(self, img: Side, txt: Side) -> Side:
        x = img.x
        for block in self.dec_list:
            x = block(x, img.mask, txt.x, txt.mask, img.rel)
        return Side(x, img.mask)


def _uses(blocks, flag: str) -> bool:
    """Whether any block (or any candidate of a mixed block) has ``flag`` set."""
    return any(getattr(op, flag, False) for b in blocks
               for op in getattr(b, "candidate_ops", [b]))


class AttFlat(nn.Module):
    """Attention pooling of a sequence: MLP glimpses, masked softmax, Linear(H -> out)."""

    def __init__(self, hsize: int, mid: int, glimpses: int, out: int, dropout_r: float):
        super().__init__()
        self.mlp = MLP(hsize, mid, glimpses, dropout_r)
        self.linear_merge = nn.Linear(hsize * glimpses, out)

    def forward(self, x, mask):
        att = self.mlp(x)                                         # [B, N, G]
        att = att.masked_fill(mask.squeeze(1).squeeze(1).unsqueeze(2), -1e9)
        att = torch.softmax(att, dim=1)
        pooled = torch.einsum("bng,bnh->bgh", att, x).flatten(1)
        return self.linear_merge(pooled)


class PooledFusionHead(nn.Module):
    """AttFlat over text and image, sum, LayerNorm, Linear(2H -> ``out``): the head of VQA
    (``out`` = the answers) and of image-text matching (``out`` = 1, the matching logit)."""

    # the original's names of these weights (full_vqa.py: x is the text, y the image regions)
    ORIGINAL_KEY_PREFIXES = (("attflat_x.", "head.attflat_lang."),
                             ("attflat_y.", "head.attflat_img."),
                             ("proj_norm.", "head.proj_norm."), ("proj.", "head.proj."))

    def __init__(self, cfg, out: int):
        super().__init__()
        pooled = 2 * cfg.HSIZE
        self.attflat_img = AttFlat(cfg.HSIZE, cfg.FLAT_MLP_SIZE, cfg.FLAT_GLIMPSES, pooled,
                                   cfg.DROPOUT_R)
        self.attflat_lang = AttFlat(cfg.HSIZE, cfg.FLAT_MLP_SIZE, cfg.FLAT_GLIMPSES, pooled,
                                    cfg.DROPOUT_R)
        self.proj_norm = LayerNorm(pooled)
        self.proj = nn.Linear(pooled, out)

    def forward(self, txt, txt_mask, img, img_mask):
        fused = self.attflat_lang(txt, txt_mask) + self.attflat_img(img, img_mask)
        return self.proj(self.proj_norm(fused))


def region_padding(feats: torch.Tensor) -> torch.Tensor:
    """[B, N] True where a region is padding: the loaders pad with all-zero rows."""
    return feats.abs().sum(-1) == 0


class Net(nn.Module):
    """Word embedding + LSTM, region projection, backbone, task head.

    ``forward(batch)`` returns what the head returns. ``batch`` holds ``txt`` (token ids
    [B, T]), ``img`` (region features [B, N, 2048]) and ``boxes`` ([B, N, 4]). Pairs that
    share captions or images (an ITM training sample: a caption with its image, a negative
    caption, a negative image) come as the distinct ones plus ``txt_rows`` and ``img_rows``
    ([P] indices into them, one per pair): each text and image side is then computed once.
    """

    def __init__(self, vocab_size: int, word_vectors: np.ndarray | None, cfg,
                 backbone: Backbone, head: nn.Module):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.WORD_EMBED_SIZE)
        if word_vectors is not None:
            self.embedding.weight.data.copy_(torch.from_numpy(np.asarray(word_vectors)))
        self.lstm = nn.LSTM(cfg.WORD_EMBED_SIZE, cfg.HSIZE, num_layers=1, batch_first=True)
        self.img_feat_linear = nn.Linear(cfg.IMG_FEAT_SIZE, cfg.HSIZE)
        self.backbone = backbone
        self.head = head

    def text_side(self, ids: torch.Tensor) -> Side:
        pad = ids == 0
        words = self.embedding(ids)
        x, _ = self.lstm(words)
        rel = None
        if self.backbone.linear_rel_txt is not None:
            rel = self.backbone.embed_relation(text_relation(words.detach(), pad), "txt")
        return Side(x, pad[:, None, None, :], rel)

    def image_side(self, feats: torch.Tensor, boxes: torch.Tensor) -> Side:
        pad = region_padding(feats)
        rel = None
        if self.backbone.linear_rel_img is not None:
            rel = self.backbone.embed_relation(image_relation(boxes.to(feats.dtype), pad), "img")
        return Side(self.img_feat_linear(feats), pad[:, None, None, :], rel)

    def fuse(self, txt: Side, img: Side, encoded: bool = False):
        """Encoder (unless ``txt`` is already encoded), decoder, head."""
        if not encoded:
            txt = self.backbone.encode(txt, img)
        img = self.backbone.decode(img, txt)
        return self.head(txt.x, txt.mask, img.x, img.mask)

    def forward(self, batch):
        txt = self.text_side(batch["txt"])
        img = self.image_side(batch["img"], batch["boxes"])
        if "txt_rows" not in batch:
            return self.fuse(txt, img)
        # In training, a caption's pairs then share the encoder's dropout masks, as they
        # would if the caption were embedded once, VSE-style (same expected gradient).
        txt, encoded = self.shared_text(txt)
        return self.fuse(txt.take(batch["txt_rows"]), img.take(batch["img_rows"]), encoded)

    def shared_text(self, txt: Side) -> tuple[Side, bool]:
        """(the part of the text side that pairs can share, whether it is encoded): the
        encoded text when the encoder reads the text alone, else the side itself (the
        encoder then runs per pair, inside ``fuse``)."""
        if self.backbone.encoder_reads_image:
            return txt, False
        return self.backbone.encode(txt, None), True


def op_spec(cfg) -> OpSpec:
    return OpSpec(cfg.HSIZE, cfg.DROPOUT_R, cfg.REL_SIZE)


def fixed_backbone(cfg, arch: Arch) -> Backbone:
    spec = op_spec(cfg)
    return Backbone([build_op(op, spec) for op in arch.enc],
                    [build_op(op, spec) for op in arch.dec], cfg.REL_SIZE)


def _repeat(prior: list[str], n: int) -> list[str]:
    return [prior[i % len(prior)] for i in range(n)] if prior else [None] * n


def prior_arch(cfg) -> Arch | None:
    """The architecture the search starts from (the arg-max of the initial alphas), or None
    when it starts from uniform alphas (ENC_PRIOR and DEC_PRIOR empty)."""
    if not cfg.ENC_PRIOR or not cfg.DEC_PRIOR:
        return None
    return Arch(tuple(_repeat(cfg.ENC_PRIOR, cfg.ENC_BLOCKS)),
                tuple(_repeat(cfg.DEC_PRIOR, cfg.DEC_BLOCKS)))


def search_backbone(cfg) -> Backbone:
    """Supernet: every block a MixedOp, alphas initialised from the prior architecture."""
    spec = op_spec(cfg)
    enc = [MixedOp(cfg.ENC_CANDIDATES, spec, p, cfg.PRIOR_LOGIT)
           for p in _repeat(cfg.ENC_PRIOR, cfg.ENC_BLOCKS)]
    dec = [MixedOp(cfg.DEC_CANDIDATES, spec, p, cfg.PRIOR_LOGIT)
           for p in _repeat(cfg.DEC_PRIOR, cfg.DEC_BLOCKS)]
    return Backbone(enc, dec, cfg.REL_SIZE)


def current_arch(backbone: Backbone) -> Arch:
    """The arg-max architecture of a supernet backbone."""
    def pick(blocks):
        return tuple(b.names[int(b.alpha.argmax())] for b in blocks)
    return Arch(pick(backbone.enc_list), pick(backbone.dec_list))

