"""Region features packed into one memory-mapped store, read without decompression.

Reading one compressed ``.npz`` per sample costs ~3 ms (zip + zlib + a copy); a data loader
worker then feeds ~330 samples/s.  :func:`core.data.pack.pack` converts the ``.npz`` files of one or more
folders once into a store that :class:`PackedFeatures` (here) reads with a slice of a memory map.

On-disk layout of a store folder (all little-endian, raw C-order arrays, no headers)::

    header.json   format, version, dtype, feat_size, n_images, n_regions, sources, complete
    index.npz     per image, sorted by image id: image_id int64, offset int64 (first row),
                  count int32 (regions), height / width float64, source int16 (index into
                  header["sources"])
    feats.f16     [n_regions, feat_size] float16 (``feats.f32`` for dtype float32): the rows
                  of all images concatenated in index order, so no padding is stored
    boxes.f32     [n_regions, 4] float32 (x1, y1, x2, y2) in pixels
    progress.json only while packing: {"images_done", "rows_done"}

How a store is written: ``core/data/pack.py``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from core.data.npz import FeatureError

FORMAT, VERSION = "mmnas-packed-features", 1
DTYPES = {"float16": "f16", "float32": "f32"}
HEADER, INDEX, PROGRESS, BOXES = "header.json", "index.npz", "progress.json", "boxes.f32"
STORE_NAME = "packed"          # open_features looks for <parent of the feature dirs>/packed
FLOAT16_MAX = float(np.finfo(np.float16).max)
INDEX_FIELDS = {"image_id": np.int64, "offset": np.int64, "count": np.int32,
                "height": np.float64, "width": np.float64, "source": np.int16}


# --------------------------------------------------------------------------- store files


def feats_file(dtype: str) -> str:
    return f"feats.{DTYPES[dtype]}"


def store_files() -> list[str]:
    """Every name a store may own: only these are ever deleted by ``overwrite=True``."""
    return [HEADER, INDEX, PROGRESS, BOXES] + [feats_file(d) for d in DTYPES]


def read_header(store: Path) -> dict | None:
    """The header of ``store``, or None when there is none or it is not ours."""
    try:
        header = json.loads((Path(store) / HEADER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    return header


def source_entry(src: Path, store: Path) -> dict:
    """A source as the header records it: the resolved path, and its name relative to the
    store's parent when it lies there (so a dataset tree can be moved or mounted elsewhere)."""
    path = Path(src).resolve()
    parent = Path(store).resolve().parent
    name = str(path.relative_to(parent)) if path.is_relative_to(parent) else None
    return {"path": str(path), "name": name}


def source_index(header: dict, store: Path, d: Path) -> int | None:
    """Position of folder ``d`` among the header's sources (by resolved path or by name)."""
    wanted = source_entry(d, store)
    for i, s in enumerate(header["sources"]):
        if s["path"] == wanted["path"] or (s["name"] and s["name"] == wanted["name"]):
            return i
    return None


def find_store(dirs: list[Path], feat_size: int) -> Path | None:
    """The finished store ``<parent>/packed`` holding all of ``dirs`` (same parent), or None."""
    if not dirs:
        return None
    parents = {Path(d).absolute().parent for d in dirs}
    if len(parents) != 1:
        return None
    store = parents.pop() / STORE_NAME
    header = read_header(store)
    if not header or header.get("complete") is not True or header.get("feat_size") != feat_size:
        return None
    if any(source_index(header, store, d) is None for d in dirs):
        return None
    return store


def open_rows(path: Path, dtype, shape: tuple[int, int], mode: str) -> np.ndarray:
    """A memory map of a raw row file (a plain empty array when there are no rows)."""
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def load_index(store: Path) -> dict[str, np.ndarray]:
    with np.load(Path(store) / INDEX) as f:
        return {k: f[k] for k in INDEX_FIELDS}


# --------------------------------------------------------------------------- reading


def as_float32(rows: np.ndarray) -> np.ndarray:
    """A float32 copy; float16 goes through torch, whose vectorised cast is ~15x numpy's
    (numpy 2.4 converts half floats one by one: ~150 us for 55 regions, torch ~12 us)."""
    if rows.dtype == np.float32:
        return np.array(rows)
    return torch.from_numpy(rows).to(torch.float32).numpy()


class StorePaths(Mapping):
    """``image id -> Path('<store>/#<id>')`` for messages, without building a dict."""

    def __init__(self, owner: "PackedFeatures"):
        self.owner = owner

    def __getitem__(self, image_id):
        if self.owner.position(image_id) is None:
            raise KeyError(image_id)
        return Path(f"{self.owner.store}/#{image_id}")

    def __contains__(self, image_id) -> bool:
        return self.owner.position(image_id) is not None

    def __iter__(self):
        return iter(self.owner.index["image_id"].tolist())

    def __len__(self) -> int:
        return len(self.owner.index["image_id"])


class PackedFeatures:
    """A finished store read like :class:`~core.data.npz.NpzFeatures`.

    ``dirs`` (default: all sources) limits the images to those packed from these folders, so
    a store of train2014 + val2014 opened for val2014 sees what ``NpzFeatures`` would.  The
    index and the memory maps are opened on first use in each process and are left out of
    pickles: DataLoader workers receive a few hundred bytes, not the store.
    """

    def __init__(self, store: Path, dirs: list[Path] | None = None, feat_size: int = 2048):
        self.store, self.feat_size = Path(store), feat_size
        header = read_header(self.store)
        if header is None or header.get("complete") is not True:
            raise FeatureError(f"{self.store} is not a finished packed feature store (no "
                               f"{HEADER} with complete: true); run pack_features.py")
        if header["feat_size"] != feat_size:
            raise FeatureError(f"{self.store}: packed {header['feat_size']}-d features, "
                               f"expected {feat_size}-d (IMG_FEAT_SIZE)")
        self.header = header
        self.dirs = [Path(s["path"]) for s in header["sources"]] if dirs is None else \
            [Path(d) for d in dirs]
        self.sources = [self.source_of(d) for d in self.dirs]
        self.reset()

    def source_of(self, d: Path) -> int:
        i = source_index(self.header, self.store, d)
        if i is None:
            raise FeatureError(f"{d} is not among the folders packed into {self.store} ("
                               f"{', '.join(s['path'] for s in self.header['sources'])})")
        return i

    def reset(self) -> None:
        self._index = self._feats = self._boxes = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_index=None, _feats=None, _boxes=None)
        return state

    @property
    def index(self) -> dict[str, np.ndarray]:
        """The index rows of the selected sources (still sorted by image id)."""
        if self._index is None:
            index = load_index(self.store)
            keep = np.isin(index["source"], self.sources)
            self._index = {k: v[keep] for k, v in index.items()}
        return self._index

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self._feats is None:
            n, dtype = self.header["n_regions"], self.header["dtype"]
            # copy-on-write maps: writable (torch.from_numpy warns on read-only arrays), yet
            # never written, so every page stays shared with the OS page cache
            self._feats = open_rows(self.store / feats_file(dtype), dtype, (n, self.feat_size), "c")
            self._boxes = open_rows(self.store / BOXES, np.float32, (n, 4), "c")
        return self._feats, self._boxes

    def position(self, image_id) -> int | None:
        ids = self.index["image_id"]
        try:
            i = int(np.searchsorted(ids, image_id))
        except (TypeError, ValueError, OverflowError):
            return None
        return i if i < len(ids) and ids[i] == image_id else None

    @property
    def paths(self) -> Mapping:
        return StorePaths(self)

    def describe(self) -> str:
        return f"the packed store {self.store} (packed from {', '.join(map(str, self.dirs))})"

    def check(self, needed: dict[int, str]) -> None:
        """``needed``: image id -> who needs it (for the message). Fails on the first gap."""
        missing = [iid for iid in needed if self.position(iid) is None]
        if missing:
            iid = missing[0]
            raise FeatureError(
                f"no features for image id {iid} (needed by {needed[iid]}) in {self.describe()};"
                f" {len(missing)} of {len(needed)} image ids are not in it (re-pack with "
                f"pack_features.py --overwrite if the source folders changed)")

    def load(self, image_id: int, max_regions: int):
        """(features [K, feat_size] float32, boxes [K, 4] float32, (height, width))."""
        i = self.position(image_id)
        if i is None:
            raise FeatureError(f"no features for image id {image_id} in {self.describe()}")
        index, (feats, boxes) = self.index, self.rows()
        start = int(index["offset"][i])
        rows = slice(start, start + min(int(index["count"][i]), max_regions))
        return (as_float32(feats[rows]), np.array(boxes[rows], np.float32),
                (float(index["height"][i]), float(index["width"][i])))
