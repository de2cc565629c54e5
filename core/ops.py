"""The operator registry: every candidate block of the search space, one call signature.

Every operator maps ``(x, x_mask, y, y_mask, rel) -> x'`` of the same shape ``[B, N, H]``:
``x`` is the sequence the block updates, ``y`` the other modality (guided attention reads
it), masks are bool ``[B, 1, 1, N]`` with True at padded positions, ``rel`` the relation
embedding of ``x``'s positions ``[B, N, N, REL_SIZE]`` (None when no block needs it).
All but ``skip_connect`` are wrapped the same way: ``LN(x + Dropout(f(x)))``.
Module names follow the original (MCAN/MMNas) so that released weights map one to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """The original's LayerNorm: ``a * (x - mean) / (std + eps) + b``.

    Not ``nn.LayerNorm``: the std is *unbiased* and eps is added outside the square root.
    Released checkpoints were trained with this formula, so we keep it.
    """

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.a_2 = nn.Parameter(torch.ones(size))
        self.b_2 = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even under bf16/fp16 autocast.
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # The same formula as ``std(-1)``, spelt out: on CPUs ``Tensor.std`` over a short last
        # dimension is several times slower than these elementwise ops (README, Performance).
        centred = x32 - x32.mean(-1, keepdim=True)
        std = (centred.square().sum(-1, keepdim=True) / (x32.size(-1) - 1)).sqrt()
        return (self.a_2 * centred / (std + self.eps) + self.b_2).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks cost a quarter of the random draws.

    PyTorch's CPU dropout draws one Mersenne-Twister number per element, a quarter of the
    demo's ITM training step in the torch profiler. Here each 64-bit draw gives four 16-bit uniform lanes; an element is kept
    when its lane is at or above ``round(p * 65536)``, so the drop rate is ``p`` to 1/65536.
    The draws come from the same global generator (seeded, saved in checkpoints), so runs
    stay reproducible and resumable. GPUs (Philox masks are cheap there) and compiled graphs
    keep ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling() or self.inplace:
            return super().forward(x)
        # where() keeps a bool mask for the backward pass, as F.dropout does.
        return torch.where(cpu_keep_mask(x.shape, self.p), x * (1.0 / (1.0 - self.p)), 0)


def cpu_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool mask of ``shape``, True (kept) with probability ``1 - p`` (to 1/65536)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
    lanes = words.view(torch.int16)[:n].view(shape)        # uniform on [-32768, 32767]
    return lanes >= round(p * 65536) - 32768


class FC(nn.Module):
    def __init__(self, in_size: int, out_size: int, dropout_r: float = 0.0, relu: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.dropout = Dropout(dropout_r) if dropout_r > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.relu(self.linear(x)))


class MLP(nn.Module):
    def __init__(self, in_size: int, mid_size: int, out_size: int, dropout_r: float = 0.0):
        super().__init__()
        self.fc = FC(in_size, mid_size, dropout_r)
        self.linear = nn.Linear(mid_size, out_size)

    def forward(self, x):
        return self.linear(self.fc(x))


@dataclass(frozen=True)
class OpSpec:
    """Sizes every operator is built from."""
    hsize: int
    dropout_r: float = 0.1
    rel_size: int = 64


class MHAtt(nn.Module):
    """Multi-head attention, heads = H_inside / base; q, k, v, merge without bias."""

    def __init__(self, spec: OpSpec, base: int = 64, hsize_k: float = 1, relation: bool = False):
        super().__init__()
        inside = int(spec.hsize * hsize_k)
        if inside % base:
            raise ValueError(f"attention base {base} does not divide hidden size {inside}")
        self.heads, self.base = max(inside // base, 1), base
        self.linear_q = nn.Linear(spec.hsize, inside, bias=False)
        self.linear_k = nn.Linear(spec.hsize, inside, bias=False)
        self.linear_v = nn.Linear(spec.hsize, inside, bias=False)
        self.linear_merge = nn.Linear(inside, spec.hsize, bias=False)
        # RSA: one geometric prior per head from the shared relation embedding.
        self.linear_r = nn.Linear(spec.rel_size, self.heads, bias=True) if relation else None
        self.dropout = Dropout(spec.dropout_r)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, q, kv, kv_mask, rel=None):
        # PyTorch's fused attention wins on GPUs; on CPUs, with an additive mask, it is
        # measured 2.3x slower than the plain formula (forward + backward, B=32, N=100).
        if q.is_cuda:
            return self.fused(q, kv, kv_mask, rel)
        return self.reference(q, kv, kv_mask, rel)

    def fused(self, q, kv, kv_mask, rel=None):
        """``reference`` through ``F.scaled_dot_product_attention``."""
        b, n, _ = q.shape
        query, key, value = self._split(self.linear_q(q)), self._split(self.linear_k(kv)), \
            self._split(self.linear_v(kv))
        # One additive bias carries the relation prior and the mask (-1e9 at padding, as the
        # original's masked_fill): fused attention then computes the same softmax.
        bias = None if self.linear_r is None else self.relation_prior(rel)
        if kv_mask is not None:
            pad = torch.zeros(kv_mask.shape, dtype=query.dtype, device=query.device)
            pad = pad.masked_fill(kv_mask, -1e9)
            bias = pad if bias is None else bias.to(query.dtype) + pad
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None if bias is None else bias.to(query.dtype),
            dropout_p=self.dropout.p if self.training else 0.0)
        return self.linear_merge(out.transpose(1, 2).reshape(b, n, -1))

    def relation_prior(self, rel: torch.Tensor) -> torch.Tensor:
        """RSA's per-head log prior ``log(max(ReLU(linear_r(rel)), 1e-6))``, [B, heads, N, N]."""
        r = self.linear_r
        if r.out_features == 1:
            # One head (H = 64): the same linear as a matrix-vector product, whose backward
            # is a broadcast; as a [B*N*N, 1] x [1, REL_SIZE] matrix product, forward and
            # backward are ~1.8x slower on CPUs (6 % of the demo's ITM step).
            logits = (rel @ r.weight[0] + r.bias[0]).unsqueeze(-1)
        else:
            logits = r(rel)
        return F.relu(logits).clamp(min=1e-6).log().permute(0, 3, 1, 2)

    def reference(self, q, kv, kv_mask, rel=None):
        """The plain formula (masked_fill, softmax, dropout), to test the fused path by."""
        b, n, _ = q.shape
        query, key, value = self._split(self.linear_q(q)), self._split(self.linear_k(kv)), \
            self._split(self.linear_v(kv))
        scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
        if self.linear_r is not None:
            scores = scores + self.relation_prior(rel)
        if kv_mask is not None:
            scores = scores.masked_fill(kv_mask, -1e9)
        att = self.dropout(F.softmax(scores, dim=-1))
        return self.linear_merge((att @ value).transpose(1, 2).reshape(b, n, -1))


class ResidualOp(nn.Module):
    """``LN(x + Dropout(f(...)))``; subclasses define ``f``."""

    uses_rel = False   # needs the relation embedding of x's positions
    uses_y = False     # reads the other modality

    def __init__(self, spec: OpSpec):
        super().__init__()
        self.dropout = Dropout(spec.dropout_r)
        self.norm = LayerNorm(spec.hsize)

    def f(self, x, x_mask, y, y_mask, rel):
        raise NotImplementedError

    def forward(self, x, x_mask, y, y_mask, rel):
        return self.norm(x + self.dropout(self.f(x, x_mask, y, y_mask, rel)))


class SelfAtt(ResidualOp):
    def __init__(self, spec, base=64, hsize_k=1):
        super().__init__(spec)
        self.mhatt = MHAtt(spec, base, hsize_k)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.mhatt(x, x, x_mask)


class RelSelfAtt(ResidualOp):
    uses_rel = True

    def __init__(self, spec, base=64, hsize_k=1):
        super().__init__(spec)
        self.mhatt = MHAtt(spec, base, hsize_k, relation=True)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.mhatt(x, x, x_mask, rel)


class GuidedAtt(ResidualOp):
    uses_y = True

    def __init__(self, spec, base=64, hsize_k=1):
        super().__init__(spec)
        self.mhatt = MHAtt(spec, base, hsize_k)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.mhatt(x, y, y_mask)


class UniAtt(ResidualOp):
    """Queries from x, keys and values from the union cat(x, y)."""
    uses_y = True

    def __init__(self, spec, base=64, hsize_k=1):
        super().__init__(spec)
        self.mhatt = MHAtt(spec, base, hsize_k)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.mhatt(x, torch.cat([x, y], 1), torch.cat([x_mask, y_mask], -1))


class FeedForward(ResidualOp):
    """Linear(H -> mid) + ReLU + Dropout + Linear(mid -> H), optionally deeper."""

    def __init__(self, spec, mid_k=4, deep=False):
        super().__init__(spec)
        mid = spec.hsize * mid_k
        if deep:
            self.mlp = nn.Sequential(FC(spec.hsize, mid, spec.dropout_r),
                                     MLP(mid, mid, spec.hsize, spec.dropout_r))
        else:
            self.mlp = MLP(spec.hsize, mid, spec.hsize, spec.dropout_r)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.mlp(x)


class GatedLinear(ResidualOp):
    """GLU: Linear(H -> 2 mid), a * sigmoid(b), Linear(mid -> H)."""

    def __init__(self, spec, mid_k=1):
        super().__init__(spec)
        mid = spec.hsize * mid_k
        self.linear_in = nn.Linear(spec.hsize, 2 * mid)
        self.linear_out = nn.Linear(mid, spec.hsize)

    def f(self, x, x_mask, y, y_mask, rel):
        return self.linear_out(F.glu(self.linear_in(x), dim=-1))


class Conv(ResidualOp):
    """1-D convolution over the sequence; padded positions are zeroed first."""

    def __init__(self, spec, kernel=3, separable=False):
        super().__init__(spec)
        h, pad = spec.hsize, kernel // 2
        if separable:
            self.conv = nn.Sequential(nn.Conv1d(h, h, kernel, padding=pad, groups=h),
                                      nn.Conv1d(h, h, 1))
        else:
            self.conv = nn.Conv1d(h, h, kernel, padding=pad)

    def f(self, x, x_mask, y, y_mask, rel):
        if x_mask is not None:
            x = x.masked_fill(x_mask.squeeze(1).squeeze(1).unsqueeze(-1), 0.0)
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Zero(ResidualOp):
    """``none``: f(x) = 0, so the block is LN(x)."""

    def f(self, x, x_mask, y, y_mask, rel):
        return torch.zeros_like(x)


class Identity(nn.Module):
    """``skip_connect``: the block passes x through unchanged (no norm)."""
    uses_rel = False
    uses_y = False

    def __init__(self, spec):
        super().__init__()

    def forward(self, x, x_mask, y, y_mask, rel):
        return x


def _registry() -> dict[str, Callable[[OpSpec], nn.Module]]:
    ops: dict[str, Callable[[OpSpec], nn.Module]] = {
        "none": Zero,
        "skip_connect": Identity,
        "feed_forward": lambda s: FeedForward(s, 4),
        "feed_forward_deep": lambda s: FeedForward(s, 4, deep=True),
        "gated_linear_1": lambda s: GatedLinear(s, 1),
        "gated_linear_2": lambda s: GatedLinear(s, 2),
    }
    for k in (2, 8, 16, 32):
        ops[f"feed_forward_{k}"] = lambda s, k=k: FeedForward(s, k)
    for k in (3, 5, 7, 11):
        ops[f"sep_conv_{k}"] = lambda s, k=k: Conv(s, k, separable=True)
        ops[f"std_conv_{k}"] = lambda s, k=k: Conv(s, k)
    kinds = {"self_att": SelfAtt, "guided_att": GuidedAtt, "rel_self_att": RelSelfAtt,
             "uniimg_att": UniAtt}
    for name, cls in kinds.items():
        for base in (16, 32, 64, 128, 256):
            ops[f"{name}_{base}"] = lambda s, c=cls, b=base: c(s, b, 1)
            ops[f"{name}_{base}_2"] = lambda s, c=cls, b=base: c(s, b, 2)
    return ops


OPS = _registry()

def build_op(name: str, spec: OpSpec) -> nn.Module:
    if name not in OPS:
        raise KeyError(f"unknown operator {name!r}; valid names: {', '.join(sorted(OPS))}")
    return OPS[name](spec)

