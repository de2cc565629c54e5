"""Backbone (encoder over text, decoder over image regions) and the network around it.

The same ``Backbone`` class holds fixed operators (a trained architecture) or ``MixedOp``
blocks (the search supernet); ``convert_supernet_state`` turns a supernet's weights into the
fixed network of an architecture (ProxylessNAS's ``convert_to_normal_net``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.arch import Arch
from core.mixed import MixedOp
from core.ops import OpSpec, build_op, op_uses_rel
from core.relations import image_relation, text_relation


class Backbone(nn.Module):
    def __init__(self, enc: list[nn.Module], dec: list[nn.Module], rel_size: int):
        super().__init__()
        self.enc_list = nn.ModuleList(enc)
        self.dec_list = nn.ModuleList(dec)
        # Shared relation embedding, Linear(4 -> REL_SIZE) + ReLU; built only when used.
        self.linear_rel_img = nn.Linear(4, rel_size) if _uses_rel(dec) else None
        self.linear_rel_txt = nn.Linear(3, rel_size) if _uses_rel(enc) else None

    def forward(self, txt, txt_mask, img, img_mask, rel_inputs):
        """``rel_inputs()`` returns the raw (text, image) relations; called only if needed."""
        txt_rel = img_rel = None
        if self.linear_rel_img is not None or self.linear_rel_txt is not None:
            raw_txt, raw_img = rel_inputs(self.linear_rel_txt is not None,
                                          self.linear_rel_img is not None)
            if raw_txt is not None:
                txt_rel = torch.relu(self.linear_rel_txt(raw_txt))
            if raw_img is not None:
                img_rel = torch.relu(self.linear_rel_img(raw_img))
        for block in self.enc_list:
            txt = block(txt, txt_mask, img, img_mask, txt_rel)
        for block in self.dec_list:
            img = block(img, img_mask, txt, txt_mask, img_rel)
        return txt, img


def _uses_rel(blocks) -> bool:
    return any(getattr(b, "uses_rel", False) for b in blocks)


class AttFlat(nn.Module):
    """Attention pooling of a sequence: MLP glimpses, masked softmax, Linear(H -> out)."""

    def __init__(self, hsize: int, mid: int, glimpses: int, out: int, dropout_r: float):
        super().__init__()
        from core.ops import MLP
        self.mlp = MLP(hsize, mid, glimpses, dropout_r)
        self.linear_merge = nn.Linear(hsize * glimpses, out)

    def forward(self, x, mask):
        att = self.mlp(x)                                         # [B, N, G]
        att = att.masked_fill(mask.squeeze(1).squeeze(1).unsqueeze(2), -1e9)
        att = torch.softmax(att, dim=1)
        pooled = torch.einsum("bng,bnh->bgh", att, x).flatten(1)
        return self.linear_merge(pooled)


class Net(nn.Module):
    """Word embedding + LSTM, region projection, backbone, task head.

    ``forward(batch)`` returns what the head returns. ``batch`` holds ``txt`` (token ids
    [B, T]), ``img`` (region features [B, N, 2048]) and ``boxes`` ([B, N, 4]).
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

    def encode(self, batch):
        ids, feats = batch["txt"], batch["img"]
        txt_pad = ids == 0
        img_pad = feats.abs().sum(-1) == 0
        words = self.embedding(ids)
        txt, _ = self.lstm(words)
        img = self.img_feat_linear(feats)

        def rel_inputs(need_txt: bool, need_img: bool):
            return (text_relation(words.detach(), txt_pad) if need_txt else None,
                    image_relation(batch["boxes"].to(feats.dtype), img_pad) if need_img else None)

        txt_mask, img_mask = txt_pad[:, None, None, :], img_pad[:, None, None, :]
        txt, img = self.backbone(txt, txt_mask, img, img_mask, rel_inputs)
        return txt, txt_mask, img, img_mask

    def forward(self, batch):
        return self.head(*self.encode(batch))


def op_spec(cfg) -> OpSpec:
    return OpSpec(cfg.HSIZE, cfg.DROPOUT_R, cfg.REL_SIZE)


def fixed_backbone(cfg, arch: Arch) -> Backbone:
    spec = op_spec(cfg)
    return Backbone([build_op(op, spec) for op in arch.enc],
                    [build_op(op, spec) for op in arch.dec], cfg.REL_SIZE)


def _repeat(prior: list[str], n: int) -> list[str]:
    return [prior[i % len(prior)] for i in range(n)] if prior else [None] * n


def search_backbone(cfg) -> Backbone:
    """Supernet: every block a MixedOp, alphas initialised from the prior architecture."""
    spec = op_spec(cfg)
    enc = [MixedOp(cfg.ENC_CANDIDATES, spec, p)
           for p in _repeat(cfg.ENC_PRIOR, cfg.ENC_BLOCKS)]
    dec = [MixedOp(cfg.DEC_CANDIDATES, spec, p)
           for p in _repeat(cfg.DEC_PRIOR, cfg.DEC_BLOCKS)]
    return Backbone(enc, dec, cfg.REL_SIZE)


def current_arch(backbone: Backbone) -> Arch:
    """The arg-max architecture of a supernet backbone."""
    def pick(blocks):
        return tuple(b.names[int(b.alpha.argmax())] for b in blocks)
    return Arch(pick(backbone.enc_list), pick(backbone.dec_list))


def convert_supernet_state(state: dict, backbone: Backbone, arch: Arch) -> dict:
    """Weights of a supernet -> weights of the fixed network of ``arch``.

    ``...enc_list.3.candidate_ops.k.<rest>`` -> ``...enc_list.3.<rest>`` for the chosen
    candidate k (read from the supernet ``backbone``); other candidates and alphas are
    dropped (ProxylessNAS's ``convert_to_normal_net``, on state dicts).
    """
    chosen = {}
    for side in ("enc", "dec"):
        for i, (block, op) in enumerate(zip(getattr(backbone, f"{side}_list"),
                                            getattr(arch, side))):
            if op not in block.names:
                raise ValueError(f"{side}[{i}]: op {op!r} is not a candidate of the supernet "
                                 f"({', '.join(block.names)})")
            chosen[f"{side}_list.{i}."] = block.names.index(op)
    unused = [f"backbone.linear_rel_{m}." for m, side in (("txt", "enc"), ("img", "dec"))
              if not arch.uses(side, op_uses_rel)]
    out = {}
    for key, value in state.items():
        marker = ".candidate_ops."
        if key.endswith(".alpha") or any(key.startswith(u) for u in unused):
            continue
        if marker in key:
            head, rest = key.split(marker, 1)
            k, rest = rest.split(".", 1)
            block = head.rsplit("backbone.", 1)[-1] + "."
            if int(k) != chosen[block]:
                continue
            key = f"{head}.{rest}"
        out[key] = value
    return out
