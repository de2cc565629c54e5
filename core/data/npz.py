"""Bottom-up-attention region features: one ``.npz`` per image, found by image id (the leaf
reader; ``core.data.features.open_features`` picks it or the packed store)."""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np


class FeatureError(ValueError):
    pass


# How a task's feature files are named, as shown when one is missing ({id}: the image id).
# Any name whose number after the last '_' (up to the first '.') is the id is found.
COCO_FEATURE_NAMES = ("*_{id:012d}.jpg.npz",)         # COCO_val2014_000000000042.jpg.npz


def image_id_of(name: str) -> int | None:
    """``COCO_train2014_000000000009.jpg.npz`` -> 9 (the number after the last '_')."""
    if not name.endswith(".npz"):
        return None
    stem = name.split("_")[-1].split(".")[0]
    return int(stem) if stem.isdigit() else None


class NpzFeatures:
    """Maps image ids to feature files across some folders and reads them.

    ``x`` is stored ``[2048, K]`` in the public files (and ``[K, 2048]`` by newer
    extractors); both are accepted and returned as ``[K, 2048]``.
    """

    def __init__(self, dirs: list[Path], feat_size: int = 2048,
                 names: tuple[str, ...] = COCO_FEATURE_NAMES):
        self.dirs, self.feat_size, self.names = [Path(d) for d in dirs], feat_size, names
        self._paths: dict[int, Path] | None = None

    @property
    def paths(self) -> dict[int, Path]:
        if self._paths is None:
            self._paths = {}
            for d in self.dirs:
                if d.is_dir():
                    for entry in os.scandir(d):
                        iid = image_id_of(entry.name)
                        if iid is not None:
                            self._paths[iid] = Path(entry.path)
        return self._paths

    def check(self, needed: dict[int, str]) -> None:
        """``needed``: image id -> who needs it (for the message). Fails on the first gap."""
        missing = [iid for iid in needed if iid not in self.paths]
        if missing:
            iid = missing[0]
            where = ", ".join(str(d) for d in self.dirs)
            raise FeatureError(
                f"no feature file for image id {iid} (needed by {needed[iid]}); looked for "
                f"{self.looked_for(iid)} in {where}; {len(missing)} of {len(needed)} image ids "
                f"have no feature file")

    def looked_for(self, image_id: int) -> str:
        """The file names searched for ``image_id``: ``'1000092795.jpg.npz' or ...``."""
        return " or ".join(f"'{n.format(id=image_id)}'" for n in self.names)

    def load(self, image_id: int, max_regions: int):
        """(features [K, 2048] float32, boxes [K, 4] float32, (height, width))."""
        path = self.paths.get(image_id)
        if path is None:
            raise FeatureError(f"no feature file for image id {image_id} in "
                               f"{', '.join(map(str, self.dirs))} (looked for "
                               f"{self.looked_for(image_id)})")
        return read_npz(path, self.feat_size, max_regions)


# What numpy, zipfile and zlib raise on a truncated, zero-byte or corrupt file, or on a member
# that is not a plain array (object arrays need pickle, which stays off).
UNREADABLE = (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zlib.error)


def check_keys(path: Path, npz) -> None:
    """An opened feature file has every key we read, or the error names the missing ones."""
    absent = [k for k in ("x", "bbox", "image_h", "image_w") if k not in npz.files]
    if absent:
        raise FeatureError(f"{path}: missing key(s) {', '.join(absent)} (a bottom-up "
                           f"feature file has x, bbox, image_h, image_w, num_bbox)")


def open_fields(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a feature file; any unreadable file is a FeatureError naming it."""
    try:
        with np.load(path) as f:
            check_keys(path, f)
            return {k: f[k] for k in names}
    except FeatureError:
        raise
    except UNREADABLE as e:
        kind = f"zlib.{type(e).__name__}" if isinstance(e, zlib.error) else type(e).__name__
        raise FeatureError(f"{path}: not a readable .npz feature file ({kind}: {e}); "
                           f"re-extract or re-download it") from None


def image_size(path: Path, fields: dict[str, np.ndarray]) -> tuple[float, float]:
    """(image_h, image_w), each one positive finite number."""
    size = []
    for key in ("image_h", "image_w"):
        v = fields[key]
        if v.size != 1 or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all() \
                or float(v.reshape(())) <= 0:
            shown = v.tolist() if v.size <= 4 else f"an array of shape {list(v.shape)}"
            raise FeatureError(f"{path}: field '{key}' is {shown!r} ({v.dtype}), expected one "
                               f"positive number (the image size in pixels)")
        size.append(float(v.reshape(())))
    return size[0], size[1]


def check_dtype(path: Path, key: str, a: np.ndarray) -> None:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise FeatureError(f"{path}: field '{key}' has dtype {a.dtype}, expected float32 "
                           f"or float16 numbers")


def check_finite(path: Path, key: str, a: np.ndarray, row_name: str) -> None:
    """Real numbers only: one NaN or inf in one of 120,000 files makes every weight NaN."""
    bad = ~np.isfinite(a)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        kinds = sorted({"nan" if np.isnan(v) else "inf" for v in a[bad][:1000].tolist()})
        iid = image_id_of(Path(path).name)
        image = f" of image id {iid}" if iid is not None else ""
        raise FeatureError(f"{path}: field '{key}' holds {int(bad.sum())} non-finite value(s) "
                           f"({', '.join(kinds)}), the first at {row_name} {row}{image}, "
                           f"column {col}; re-extract this image's features")


def read_npz(path: Path, feat_size: int, max_regions: int):
    fields = open_fields(path, ("x", "bbox", "image_h", "image_w"))
    x, boxes = fields["x"], fields["bbox"]
    size = image_size(path, fields)
    check_dtype(path, "x", x)
    check_dtype(path, "bbox", boxes)
    if x.ndim != 2 or feat_size not in x.shape:
        raise FeatureError(f"{path}: field 'x' has shape {list(x.shape)}, expected "
                           f"[{feat_size}, K] or [K, {feat_size}]")
    if x.shape[1] != feat_size:
        x = x.T
    if boxes.shape != (x.shape[0], 4):
        raise FeatureError(f"{path}: field 'bbox' has shape {list(boxes.shape)}, expected "
                           f"[{x.shape[0]}, 4] (one box per region of 'x')")
    check_finite(path, "x", x, "region")
    check_finite(path, "bbox", boxes, "region")
    k = min(x.shape[0], max_regions)
    return (np.ascontiguousarray(x[:k], np.float32), np.asarray(boxes[:k], np.float32), size)

