"""Region features, whichever way they are stored: ``open_features`` picks the packed store
(``packed.py``) when one is finished, else the ``.npz`` files (``npz.py``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.data.npz import COCO_FEATURE_NAMES, NpzFeatures
from core.data.packed import PackedFeatures, find_store


def pad_regions(items: list[np.ndarray], width: int) -> np.ndarray:
    """Stack ``[K_i, width]`` arrays into ``[B, max K, width]`` with zero rows (= masked)."""
    n = max(max(len(a) for a in items), 1)
    out = np.zeros((len(items), n, width), np.float32)
    for i, a in enumerate(items):
        out[i, :len(a)] = a
    return out


def open_features(dirs: list[Path], feat_size: int = 2048,
                  names: tuple[str, ...] = COCO_FEATURE_NAMES):
    """The fastest reader of the features in ``dirs``: a packed store if one is finished.

    ``names``: how the task's files are named, for the message when one is missing.

    Rule: ``<parent>/packed`` is used when all ``dirs`` share that parent and its
    ``header.json`` says ``complete: true``, has this ``feat_size`` and lists every dir among
    its sources (same resolved path, or same name relative to ``<parent>``).  It is then read
    restricted to those dirs' images.  Build it with e.g. ``pack_features.py --src
    datasets/coco_extract/train2014 datasets/coco_extract/val2014 --out
    datasets/coco_extract/packed``.  Otherwise (no store, unfinished, other folders) the
    ``.npz`` files are read by :class:`NpzFeatures`.  A store is not re-checked against the
    folders: re-pack with ``--overwrite`` after adding feature files.
    """
    store = find_store([Path(d) for d in dirs], feat_size)
    if store is None:
        return NpzFeatures(dirs, feat_size, names)
    return PackedFeatures(store, dirs, feat_size)
