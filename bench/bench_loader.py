"""Samples/s of ``features.load()`` per feature format, for one data loader worker.

    OMP_NUM_THREADS=1 python3 bench/bench_loader.py                 # 500 images, ~1 s a row
    python3 bench/bench_loader.py --images 2000 --seconds 3 --workers 4

Writes ``--images`` demo images (``demo.scenes`` regions, 10..100 per image) into a
temporary folder as compressed ``.npz`` (the public format), uncompressed ``.npz``, and packed
float16 / float32 stores, then times ``load(image_id, 100)`` in one process and one thread,
in a random order, after one untimed warm-up pass over every image: the OS page cache is warm
for every format, so the rows compare decoding, not the disk.  The last row reads the float16
store through a ``torch`` DataLoader, in process and with ``--workers`` processes, batches of
64 padded like the tasks' collate (``pad_regions`` to float32 [64, max K, 2048]): these rows
show what the rest of the input pipeline costs once loading is cheap.  Prints a table and
writes JSON to bench/results/loader.json.

The demo features are sparser than real bottom-up features, so their compressed files are
smaller and faster to inflate than the real ones (~3 ms each); the packed rows cost the same
for any content.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from core.data.features import pad_regions  # noqa: E402
from core.data.npz import NpzFeatures  # noqa: E402
from core.data.pack import pack  # noqa: E402
from core.data.packed import PackedFeatures  # noqa: E402
from demo.scenes import make_scene, write_feature_file  # noqa: E402

MAX_REGIONS = 100


def demo_image(image_id: int, k: int, rng: np.random.Generator):
    """A scene with ``k`` regions: the regions of as many demo scenes as it takes."""
    scene = make_scene(image_id, rng)
    feats, boxes = [scene.regions_feat], [scene.regions_box]
    while sum(map(len, feats)) < k:
        extra = make_scene(image_id, rng)
        feats.append(extra.regions_feat)
        boxes.append(extra.regions_box)
    scene.regions_feat, scene.regions_box = np.concatenate(feats)[:k], np.concatenate(boxes)[:k]
    return scene


def write_data(root: Path, n: int, seed: int) -> list[int]:
    """The same images as compressed and uncompressed .npz files; returns their ids."""
    rng = np.random.default_rng(seed)
    for iid in range(1, n + 1):
        scene = demo_image(iid, int(rng.integers(10, MAX_REGIONS + 1)), rng)
        file = f"COCO_train2014_{iid:012d}.jpg.npz"
        write_feature_file(root / "npz" / "train2014" / file, scene)
        (root / "raw" / "train2014").mkdir(parents=True, exist_ok=True)
        np.savez(root / "raw" / "train2014" / file, x=scene.regions_feat.T,
                 bbox=scene.regions_box, image_h=np.int64(scene.height),
                 image_w=np.int64(scene.width), num_bbox=np.int64(len(scene.regions_box)))
    return list(range(1, n + 1))


def folder_mib(d: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file()) / 2**20


def samples_per_s(feats, ids: list[int], seconds: float, seed: int) -> float:
    """Warm-up pass, then random-order passes until ``seconds`` have elapsed."""
    for iid in ids:
        feats.load(iid, MAX_REGIONS)
    rng, done, t0 = np.random.default_rng(seed), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for iid in rng.permutation(ids).tolist():
            feats.load(iid, MAX_REGIONS)
        done += len(ids)
    return done / (time.perf_counter() - t0)


class LoadSet:
    """What a task's Dataset does per sample: one ``load``."""

    def __init__(self, feats, ids):
        self.feats, self.ids = feats, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.feats.load(self.ids[i], MAX_REGIONS)


def collate(samples):
    """Pad to the batch's longest like the tasks do, into tensors (shared memory)."""
    import torch
    return (torch.from_numpy(pad_regions([s[0] for s in samples], samples[0][0].shape[1])),
            torch.from_numpy(pad_regions([s[1] for s in samples], 4)))


def loader_samples_per_s(feats, ids: list[int], workers: int, seconds: float) -> float:
    """Shuffled epochs through a DataLoader; the first (worker start, warm-up) is untimed."""
    import torch
    from torch.utils.data import DataLoader
    torch.manual_seed(0)
    loader = DataLoader(LoadSet(feats, ids), batch_size=64, shuffle=True, num_workers=workers,
                        collate_fn=collate, persistent_workers=workers > 0)
    for _ in loader:
        pass
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for batch in loader:
            done += len(batch[0])
    return done / (time.perf_counter() - t0)


def run(args, root: Path) -> dict:
    t0 = time.perf_counter()
    ids = write_data(root, args.images, args.seed)
    regions = sum(len(NpzFeatures([root / "raw" / "train2014"]).load(i, 10**6)[1]) for i in ids)
    print(f"{len(ids)} images, {regions} regions written in {time.perf_counter() - t0:.1f} s",
          flush=True)
    src = lambda kind: [root / kind / "train2014"]                     # noqa: E731
    stores = {d: pack(src("raw"), root / f"packed_{d}", dtype=d, progress=False)
              for d in ("float16", "float32")}
    formats = {f"npz {kind}": (NpzFeatures(src(d)), folder_mib(root / d / "train2014"))
               for kind, d in (("compressed", "npz"), ("uncompressed", "raw"))}
    for d, info in stores.items():
        formats[f"packed {d}"] = (PackedFeatures(root / f"packed_{d}"), info["bytes"] / 2**20)
    rows = [{"format": name, "workers": 0, "mib_on_disk": round(mib, 1),
             "samples_per_s": round(samples_per_s(feats, ids, args.seconds, args.seed))}
            for name, (feats, mib) in formats.items()]
    feats, mib = formats["packed float16"]
    for workers in sorted({0, args.workers}):
        rate = loader_samples_per_s(feats, ids, workers, args.seconds)
        rows.append({"format": "packed float16 + DataLoader", "workers": workers,
                     "mib_on_disk": round(mib, 1), "samples_per_s": round(rate)})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_npz_compressed"] = round(r["samples_per_s"] / base, 1)
    return {"images": len(ids), "regions": regions, "max_regions": MAX_REGIONS,
            "pack_seconds": {d: round(i["seconds"], 2) for d, i in stores.items()},
            "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"{'format':<32}{'workers':>8}{'MiB':>9}{'samples/s':>12}{'x npz':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['format']:<32}{r['workers']:>8}{r['mib_on_disk']:>9.1f}"
                     f"{r['samples_per_s']:>12,}{r['speedup_vs_npz_compressed']:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per row (min)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of a DataLoader row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        result = run(args, Path(tmp))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
