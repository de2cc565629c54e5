"""Region features packed into one memory-mapped store, read without decompression.

Reading one compressed ``.npz`` per sample costs ~3 ms (zip + zlib + a copy); a data loader
worker then feeds ~330 samples/s.  :func:`pack` converts the ``.npz`` files of one or more
folders once into a store that :class:`PackedFeatures` reads with a slice of a memory map.

On-disk layout of a store folder (all little-endian, raw C-order arrays, no headers)::

    header.json   format, version, dtype, feat_size, n_images, n_regions, sources, complete
    index.npz     per image, sorted by image id: image_id int64, offset int64 (first row),
                  count int32 (regions), height / width float64, source int16 (index into
                  header["sources"])
    feats.f16     [n_regions, feat_size] float16 (``feats.f32`` for dtype float32): the rows
                  of all images concatenated in index order, so no padding is stored
    boxes.f32     [n_regions, 4] float32 (x1, y1, x2, y2) in pixels
    progress.json only while packing: {"images_done", "rows_done"}

Packing is two passes.  The first ("scan") reads only ``bbox`` / ``image_h`` / ``image_w`` of
every file (cheap: zip members are decompressed separately) to fix each image's row offset;
then ``index.npz`` is written, the data files are preallocated at full size (sparse) and
``header.json`` is written with ``complete: false``.  The second pass fills rows in index
order and checkpoints ``progress.json`` (after flushing the memory maps) every
``checkpoint_every`` images and when interrupted, so a rerun resumes at the first image not
known to be on disk.  ``complete: true`` is written last, atomically: a store without it is
never read.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from core.data.features import (FeatureError, image_id_of, image_size, open_fields,
                                 read_npz)

FORMAT, VERSION = "mmnas-packed-features", 1
DTYPES = {"float16": "f16", "float32": "f32"}
HEADER, INDEX, PROGRESS, BOXES = "header.json", "index.npz", "progress.json", "boxes.f32"
STORE_NAME = "packed"          # open_features looks for <parent of the feature dirs>/packed
FLOAT16_MAX = float(np.finfo(np.float16).max)
INDEX_FIELDS = {"image_id": np.int64, "offset": np.int64, "count": np.int32,
                "height": np.float64, "width": np.float64, "source": np.int16}


# --------------------------------------------------------------------------- store files


def atomic_write_json(path: Path, obj) -> None:
    """Write-then-rename, so readers see the old or the new file, never half of one (and,
    unlike ``mkstemp``, with the umask's permissions: a store is shared data)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- scanning


def list_sources(src_dirs: list[Path]) -> list[tuple[int, int, Path]]:
    """(image id, source index, file) of every feature file, sorted by image id.

    An image id found twice is an error: which copy wins would otherwise depend on the order
    of the folders, and a store keeps one row block per id.
    """
    found: dict[int, tuple[int, Path]] = {}
    for s, d in enumerate(src_dirs):
        if not d.is_dir():
            raise FeatureError(f"source folder {d} does not exist")
        for entry in os.scandir(d):
            iid = image_id_of(entry.name)
            if iid is None:
                continue
            if iid in found:
                raise FeatureError(f"image id {iid} has two feature files: {found[iid][1]} and "
                                   f"{entry.path}; remove one before packing")
            found[iid] = (s, Path(entry.path))
    if not found:
        raise FeatureError(f"no feature files named by an image id ('<id>.npz', "
                           f"'<id>.jpg.npz' or '*_<id>.jpg.npz') in "
                           f"{', '.join(map(str, src_dirs))}")
    return [(iid, s, p) for iid, (s, p) in sorted(found.items())]


def read_shape(path: Path) -> tuple[int, float, float]:
    """(box count, height, width) from the small members only; ``x`` is checked when packed."""
    fields = open_fields(path, ("bbox", "image_h", "image_w"))
    boxes, (h, w) = fields["bbox"], image_size(path, fields)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise FeatureError(f"{path}: field 'bbox' has shape {list(boxes.shape)}, expected [K, 4]")
    return boxes.shape[0], h, w


def scan(files: list[tuple[int, int, Path]], progress: bool) -> dict[str, np.ndarray]:
    """The index arrays: each image's row offset follows from the box counts before it."""
    from tqdm import tqdm
    index = {k: np.zeros(len(files), t) for k, t in INDEX_FIELDS.items()}
    for i, (iid, s, path) in enumerate(tqdm(files, desc="scan", unit="file", disable=not progress,
                                            dynamic_ncols=True)):
        count, h, w = read_shape(path)
        index["image_id"][i], index["source"][i] = iid, s
        index["count"][i], index["height"][i], index["width"][i] = count, h, w
    counts = index["count"].astype(np.int64)
    index["offset"][:] = np.cumsum(counts) - counts
    return index


# --------------------------------------------------------------------------- packing


def open_rows(path: Path, dtype, shape: tuple[int, int], mode: str) -> np.ndarray:
    """A memory map of a raw row file (a plain empty array when there are no rows)."""
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def preallocate(path: Path, nbytes: int) -> None:
    """Create the file at its final size; unwritten blocks stay sparse until filled."""
    with open(path, "wb") as f:
        f.truncate(nbytes)


def start(out_dir: Path, header: dict, index: dict[str, np.ndarray]) -> None:
    """Write the index, preallocate the data files, then the (incomplete) header."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in store_files():
        (out_dir / name).unlink(missing_ok=True)
    np.savez(out_dir / INDEX, **index)
    itemsize = np.dtype(header["dtype"]).itemsize
    preallocate(out_dir / feats_file(header["dtype"]),
                header["n_regions"] * header["feat_size"] * itemsize)
    preallocate(out_dir / BOXES, header["n_regions"] * 4 * 4)
    atomic_write_json(out_dir / HEADER, header)


def load_index(store: Path) -> dict[str, np.ndarray]:
    with np.load(Path(store) / INDEX) as f:
        return {k: f[k] for k in INDEX_FIELDS}


def read_progress(out_dir: Path) -> int:
    """Images known to be on disk (0 when none were checkpointed)."""
    try:
        return int(json.loads((out_dir / PROGRESS).read_text())["images_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def refuse_foreign(out_dir: Path) -> None:
    """Never pack into (or delete files of) a folder that holds something else."""
    ours = set(store_files())
    foreign = [e.name for e in os.scandir(out_dir) if e.name not in ours and
               not (e.name.startswith(".") and e.name.endswith(".tmp"))] if out_dir.is_dir() else []
    if foreign:
        raise FeatureError(f"{out_dir} is not empty ({foreign[0]}, ...) and holds no packed "
                           f"store; pack into a new folder, e.g. {out_dir.parent / STORE_NAME}")


def resume_point(out_dir: Path, header: dict, files: list, overwrite: bool) -> int | None:
    """Images already packed in an unfinished store of the same request, else None (start).

    Refuses to touch a finished store, or an unfinished one made for another request or from
    folders whose files changed since, unless ``overwrite``.
    """
    old = read_header(out_dir)
    if old is None:
        refuse_foreign(out_dir)
    if overwrite or old is None:
        return None
    if old.get("complete") is True:
        raise FeatureError(f"{out_dir} already holds a finished packed store "
                           f"({old['n_images']} images); pass --overwrite (overwrite=True) "
                           f"to rebuild it")
    same = {k: old.get(k) for k in ("version", "dtype", "feat_size", "sources")} == \
        {k: header[k] for k in ("version", "dtype", "feat_size", "sources")}
    index = load_index(out_dir) if same else None
    if not same or not (np.array_equal(index["image_id"], [f[0] for f in files])
                        and np.array_equal(index["source"], [f[1] for f in files])):
        raise FeatureError(f"{out_dir} holds an unfinished packed store made from other "
                           f"sources, dtype or files than this run; pass --overwrite "
                           f"(overwrite=True) to start it over")
    return read_progress(out_dir)


def checkpoint(out_dir: Path, maps: tuple, images_done: int, rows_done: int) -> None:
    """Flush the rows to disk first, so the checkpoint never claims unwritten data."""
    for m in maps:
        if isinstance(m, np.memmap):
            m.flush()
    atomic_write_json(out_dir / PROGRESS, {"images_done": images_done, "rows_done": rows_done})


def check_range(path: Path, x: np.ndarray, dtype: str) -> None:
    if dtype == "float16" and x.size and float(np.abs(x).max()) > FLOAT16_MAX:
        raise FeatureError(f"{path}: feature values up to {float(np.abs(x).max()):g} do not fit "
                           f"float16 (max {FLOAT16_MAX:g}); pack with --dtype float32")


def fill(out_dir: Path, header: dict, index: dict, files: list, first: int,
         checkpoint_every: int, progress: bool) -> None:
    """Copy the features of images ``first..`` into their rows, checkpointing as it goes."""
    from tqdm import tqdm
    n, f, dtype = header["n_regions"], header["feat_size"], header["dtype"]
    maps = (open_rows(out_dir / feats_file(dtype), dtype, (n, f), "r+"),
            open_rows(out_dir / BOXES, np.float32, (n, 4), "r+"))
    done = first
    bar = tqdm(total=len(files), initial=first, desc="pack", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        for i in range(first, len(files)):
            path = files[i][2]
            x, boxes, _ = read_npz(path, f, 1 << 62)
            if len(x) != index["count"][i]:
                raise FeatureError(f"{path}: {len(x)} regions now, {index['count'][i]} when "
                                   f"scanned; the file changed during packing")
            check_range(path, x, dtype)
            rows = slice(int(index["offset"][i]), int(index["offset"][i]) + len(x))
            maps[0][rows], maps[1][rows] = x, boxes
            done = i + 1
            bar.update(1)
            if done % checkpoint_every == 0:
                checkpoint(out_dir, maps, done, rows.stop)
    finally:
        bar.close()
        if done > first:
            rows_done = int(index["offset"][done - 1] + index["count"][done - 1])
            checkpoint(out_dir, maps, done, rows_done)
        del maps


def pack(src_dirs: list[Path], out_dir: Path, dtype: str = "float16", feat_size: int = 2048,
         overwrite: bool = False, progress: bool = True, checkpoint_every: int = 1000) -> dict:
    """Pack every feature file of ``src_dirs`` into the store ``out_dir``; returns its header
    plus ``seconds``, ``bytes`` (on disk) and ``resumed_at`` (images found done).

    Reruns of an interrupted call resume (same sources, dtype and files required).
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise FeatureError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    src_dirs, out_dir = [Path(d) for d in src_dirs], Path(out_dir)
    if any(d.resolve() == out_dir.resolve() for d in src_dirs):
        raise FeatureError(f"the output folder {out_dir} is one of the source folders; "
                           f"use a folder of its own, e.g. {out_dir.parent / STORE_NAME}")
    files = list_sources(src_dirs)
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype, "feat_size": feat_size,
              "n_images": len(files), "n_regions": 0,
              "sources": [source_entry(d, out_dir) for d in src_dirs], "complete": False}
    first = resume_point(out_dir, header, files, overwrite)
    if first is None:
        index = scan(files, progress)
        header["n_regions"] = int(index["count"].sum())
        start(out_dir, header, index)
        first = 0
    else:
        index = load_index(out_dir)
        header = read_header(out_dir)
    fill(out_dir, header, index, files, first, checkpoint_every, progress)
    header["complete"] = True
    atomic_write_json(out_dir / HEADER, header)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    size = sum((out_dir / n).stat().st_blocks * 512 for n in store_files()
               if (out_dir / n).exists())
    return {**header, "seconds": time.perf_counter() - t0, "bytes": size, "resumed_at": first}


# --------------------------------------------------------------------------- reading


def as_float32(rows: np.ndarray) -> np.ndarray:
    """A float32 copy; float16 goes through torch, whose vectorised cast is ~15x numpy's
    (numpy 2.4 converts half floats one by one: ~150 us for 55 regions, torch ~12 us)."""
    if rows.dtype == np.float32:
        return np.array(rows)
    try:
        import torch
    except ImportError:
        return rows.astype(np.float32)
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
    """A finished store read like :class:`~core.data.features.NpzFeatures`.

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
