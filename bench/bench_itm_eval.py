"""Pairs per second of the retrieval evaluation: our grouped scoring vs naive pairwise.

    python3 bench/bench_itm_eval.py [--images 8] [--captions 40] [--hsize 512] [--amp off]

Naive = every (image, caption) pair through the whole network from raw inputs, in batches
of the same size. Ours (``core.tasks.itm.score_pairs``) projects each image's regions once
per group, encodes each caption's text side once, and runs only decoder + head per pair.
Paper sizes by default (H = 512, 36 regions, 50 tokens, arch/mmnas_itm.json); random
features written to a temporary folder in the real .npz format. Writes
bench/results/itm_eval.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.arch import load_arch  # noqa: E402
from core.config import resolve  # noqa: E402
from core.data.npz import NpzFeatures  # noqa: E402
from core.loop import autocast, build_net  # noqa: E402
from core.model import fixed_backbone  # noqa: E402
from core.tasks.itm import ITMDataset, ITMTask, score_pairs  # noqa: E402


def make_dataset(folder: Path, cfg, n_images: int, n_captions: int) -> ITMDataset:
    g = np.random.default_rng(0)
    keys = list(range(1000, 1000 + n_images))
    for k in keys:
        xy = g.uniform(0, 300, (36, 2))
        np.savez(folder / f"{k}.jpg.npz", x=np.abs(g.standard_normal((2048, 36))).astype(np.float32),
                 bbox=np.concatenate([xy, xy + 50], 1).astype(np.float32), image_h=480,
                 image_w=640, num_bbox=36)
    tokens = np.zeros((n_captions, cfg.MAX_TOKEN), np.int64)
    for j in range(n_captions):
        length = int(g.integers(8, 20))
        tokens[j, :length] = g.integers(3, 10000, length)
    caption_image = np.arange(n_captions) % n_images
    return ITMDataset(tokens, caption_image, keys, NpzFeatures([folder]), cfg)


def naive(net, ds, pair_img, pair_cap, batch, cfg, device):
    out = []
    with torch.no_grad(), autocast(cfg, device):
        for s in range(0, len(pair_img), batch):
            imgs = [ds.image(int(i)) for i in pair_img[s:s + batch]]
            b = {"txt": torch.from_numpy(ds.tokens[pair_cap[s:s + batch]]).to(device),
                 "img": torch.from_numpy(np.stack([f for f, _ in imgs])).to(device),
                 "boxes": torch.from_numpy(np.stack([bx for _, bx in imgs])).to(device)}
            out.append(torch.sigmoid(net(b).float()).cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--captions", type=int, default=40)
    ap.add_argument("--hsize", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "itm_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = resolve("itm", "train", {"HSIZE": args.hsize, "SEED": 0, "AMP": args.amp})
    task = ITMTask(cfg, lambda m: None)
    task.vocab = {f"w{i}": i for i in range(10000)}
    net = build_net(cfg, task, fixed_backbone(cfg, load_arch(REPO / "arch/mmnas_itm.json", 0, 12, 18)))
    device = torch.device(args.device)
    net.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp), cfg, args.images, args.captions)
        pair_img = np.repeat(np.arange(args.images), args.captions)
        pair_cap = np.tile(np.arange(args.captions), args.images)
        rows = {}
        for name, fn in (("ours", lambda: score_pairs(net, ds, pair_img, pair_cap, device,
                                                      args.batch)),
                         ("naive", lambda: naive(net, ds, pair_img, pair_cap, args.batch, cfg,
                                                 device))):
            with autocast(cfg, device):
                t = time.perf_counter()
                scores = fn()
                rows[name] = {"seconds": time.perf_counter() - t, "scores": scores}
    diff = float(np.abs(rows["ours"]["scores"] - rows["naive"]["scores"]).max())
    result = {"pairs": len(pair_img), "hsize": args.hsize, "amp": args.amp,
              "threads": args.threads, "device": args.device, "max_abs_diff": diff}
    print(f"{len(pair_img)} pairs, H={args.hsize}, amp {args.amp}, {args.threads} threads")
    for name in ("ours", "naive"):
        pps = len(pair_img) / rows[name]["seconds"]
        result[f"{name}_pairs_per_s"] = pps
        print(f"  {name:<6} {pps:10.1f} pairs/s")
    print(f"  speed-up {result['ours_pairs_per_s'] / result['naive_pairs_per_s']:.2f}x, "
          f"max |ours - naive| = {diff:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
