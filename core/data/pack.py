"""The resumable writer of a packed feature store (layout: ``core/data/packed.py``).

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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.data.npz import FeatureError, image_id_of, image_size, open_fields, read_npz
from core.data.packed import (BOXES, DTYPES, FLOAT16_MAX, FORMAT, HEADER, INDEX, INDEX_FIELDS,
                              PROGRESS, STORE_NAME, VERSION, feats_file, load_index, open_rows,
                              read_header, source_entry, store_files)


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


