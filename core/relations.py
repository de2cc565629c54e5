"""Relation embeddings, computed per batch on the model's device (never per sample on CPU)."""
from __future__ import annotations

import torch


def image_relation(boxes: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Geometric relation of every region pair, ``[B, N, N, 4]``.

    ``boxes`` ``[B, N, 4]`` as (x1, y1, x2, y2) pixels, ``pad`` ``[B, N]`` True at padding.
    r_ij = [log(max(|cx_i - cx_j| / w_i, 1e-3)), log(max(|cy_i - cy_j| / h_i, 1e-3)),
            log(w_i / w_j), log(h_i / h_j)] with the original's ``+1`` widths; zero where
    i or j is padding.
    """
    w = (boxes[..., 2] - boxes[..., 0] + 1).clamp(min=1e-3)
    h = (boxes[..., 3] - boxes[..., 1] + 1).clamp(min=1e-3)
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    dx = ((cx[:, :, None] - cx[:, None, :]).abs() / w[:, :, None]).clamp(min=1e-3).log()
    dy = ((cy[:, :, None] - cy[:, None, :]).abs() / h[:, :, None]).clamp(min=1e-3).log()
    dw = (w[:, :, None] / w[:, None, :]).log()
    dh = (h[:, :, None] / h[:, None, :]).log()
    rel = torch.stack([dx, dy, dw, dh], -1)
    valid = ~(pad[:, :, None] | pad[:, None, :])
    return rel * valid.unsqueeze(-1)


def text_relation(vectors: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Word-pair relation ``[B, T, T, 3]``: L2 distance, cosine, relative position.

    The original divides by the square roots of the norms in its "cosine"; this is the
    true cosine. Only computed when a text-side relation operator is in the architecture.
    """
    t = vectors.size(1)
    dist = torch.cdist(vectors, vectors)
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cos = unit @ unit.transpose(1, 2)
    pos = torch.arange(t, device=vectors.device, dtype=vectors.dtype)
    rel_pos = ((pos[None, :] - pos[:, None]) / t).expand_as(dist)
    rel = torch.stack([dist, cos, rel_pos], -1)
    valid = ~(pad[:, :, None] | pad[:, None, :])
    return rel * valid.unsqueeze(-1)
