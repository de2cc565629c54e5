"""Box geometry in plain PyTorch (no compiled extension): IoU, regression deltas, clipping.

Boxes are ``(x1, y1, x2, y2)`` in pixels with Faster R-CNN's inclusive convention: a box's
width is ``x2 - x1 + 1``. Every function broadcasts over leading dimensions and runs on
whatever device its inputs live on, so targets for a whole batch are built there at once.
"""
from __future__ import annotations

import torch

# Regression targets are divided by these (the original's BBOX_NORMALIZE_STDS; means 0).
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)


def xywh_to_xyxy(box: torch.Tensor) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` with ``x2 = x + w - 1``.

    The original used ``x + w``, one pixel wider than the ``+1`` widths its IoU assumes.
    """
    x, y, w, h = box.unbind(-1)
    return torch.stack([x, y, x + w - 1, y + h - 1], -1)


def area(box: torch.Tensor) -> torch.Tensor:
    return (box[..., 2] - box[..., 0] + 1).clamp(min=0) * (box[..., 3] - box[..., 1] + 1).clamp(min=0)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a [..., N, 4]`` with ``b [..., M, 4]`` -> ``[..., N, M]``."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter / union.clamp(min=1e-9)


def _centre_size(box: torch.Tensor):
    w = box[..., 2] - box[..., 0] + 1
    h = box[..., 3] - box[..., 1] + 1
    return box[..., 0] + 0.5 * w, box[..., 1] + 0.5 * h, w, h


def encode_deltas(proposals: torch.Tensor, gt: torch.Tensor,
                  stds=DELTA_STDS) -> torch.Tensor:
    """Faster R-CNN deltas of ``gt`` w.r.t. ``proposals`` (same shape), divided by ``stds``."""
    px, py, pw, ph = _centre_size(proposals)
    gx, gy, gw, gh = _centre_size(gt)
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw),
                          torch.log(gh / ph)], -1)
    return deltas / deltas.new_tensor(stds)


def decode_deltas(proposals: torch.Tensor, deltas: torch.Tensor,
                  stds=DELTA_STDS) -> torch.Tensor:
    """Inverse of ``encode_deltas`` as py-faster-rcnn's ``bbox_transform_inv`` computes it
    (its ``x2 = cx + w/2`` has no ``- 1``; kept so scores match the original's)."""
    deltas = deltas * deltas.new_tensor(stds)
    px, py, pw, ph = _centre_size(proposals)
    cx = deltas[..., 0] * pw + px
    cy = deltas[..., 1] * ph + py
    w = torch.exp(deltas[..., 2]) * pw
    h = torch.exp(deltas[..., 3]) * ph
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def clip_boxes(box: torch.Tensor, height, width) -> torch.Tensor:
    """Clip to the image: x in [0, width - 1], y in [0, height - 1].

    ``height`` and ``width`` are numbers or tensors broadcasting with ``box[..., 0]``.
    """
    height = torch.as_tensor(height, dtype=box.dtype, device=box.device)
    width = torch.as_tensor(width, dtype=box.dtype, device=box.device)
    x1 = torch.minimum(box[..., 0].clamp(min=0), width - 1)
    y1 = torch.minimum(box[..., 1].clamp(min=0), height - 1)
    x2 = torch.minimum(box[..., 2].clamp(min=0), width - 1)
    y2 = torch.minimum(box[..., 3].clamp(min=0), height - 1)
    return torch.stack([x1, y1, x2, y2], -1)
