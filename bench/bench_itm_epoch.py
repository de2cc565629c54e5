"""Where one ITM demo training epoch spends its time: mining hard negatives (``score_pairs``
over every image's and every caption's candidates), the weight steps, the dev evaluation.

    python3 bench/bench_itm_epoch.py                    # the demo config, untrained weights
    python3 bench/bench_itm_epoch.py --set ITM_NEG_CANDIDATES=8 --steps 8

One process, one phase after the other: mining on a few images, the weight step (each side
once, then the three pairs separately, twice over), the evaluation on a few dev images, mining
again (the two mining rates show how much the machine's load moved meanwhile). The rates are
scaled to the whole epoch by its pair counts. The weights are untrained: the cost of a phase
does not depend on them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def setup(overrides: dict):
    import demo  # noqa: F401  (registers the demo builders)
    import torch

    from core.arch import load_arch
    from core.config import resolve
    from core.loop import build_net
    from core.model import fixed_backbone
    from core.run import ensure_data
    from core.tasks.itm import ITMTask

    cfg = resolve("itm", "train", {"DATASET": "demo", "SEED": 0, **overrides})
    task = ITMTask(cfg, lambda m: None)
    ensure_data(cfg, task, print)
    task.prepare()
    arch = load_arch(REPO / "arch/mmnas_itm.json", 0, cfg.ENC_BLOCKS, cfg.DEC_BLOCKS)
    torch.manual_seed(0)
    net = build_net(cfg, task, fixed_backbone(cfg, arch))
    return cfg, task, net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="weight steps to time (each way)")
    ap.add_argument("--images", type=int, default=40,
                    help="train images whose negatives are mined for the timing")
    ap.add_argument("--eval-images", type=int, default=8,
                    help="dev images scored against all dev captions for the timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. ITM_NEG_CANDIDATES=8")
    args = ap.parse_args()
    import numpy as np
    import torch
    import yaml

    from core.loop import loader
    from core.mixed import weight_parameters
    from core.tasks.itm import score_pairs

    torch.set_num_threads(args.threads)
    cfg, task, net = setup({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    cpu = torch.device("cpu")
    train, dev = task.dataset("train"), task.dataset(cfg.EVAL_SPLIT.split(",")[0])
    cands = cfg.ITM_NEG_CANDIDATES
    few = task.dataset("train")                  # the first --images images and their captions
    keep = np.flatnonzero(few.caption_image < args.images)
    few.tokens, few.caption_image = few.tokens[keep], few.caption_image[keep]
    few.keys = few.keys[:args.images]

    def mining_rate():
        """pairs/s of a hard-negative mining pass (on --images images)."""
        t = time.perf_counter()
        task.start_epoch(net, few, cfg.ITM_HARD_NEG_EPOCH, cpu)
        return (few.n_images + len(few)) * cands / (time.perf_counter() - t)

    def eval_rate():
        """pairs/s of the retrieval evaluation (--eval-images dev images x all captions)."""
        img = np.repeat(np.arange(args.eval_images), len(dev))
        cap = np.tile(np.arange(len(dev)), args.eval_images)
        t = time.perf_counter()
        score_pairs(net, dev, img, cap, cpu, cfg.eval_batch_size())
        return len(img) / (time.perf_counter() - t)

    rates = [mining_rate()]
    print(f"mining: {rates[0]:.0f} pairs/s", flush=True)
    task.start_epoch(net, train, 0, cpu)          # random negatives: three pairs per sample
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=cfg.LR_BASE)
    shared_ms, separate_ms = shared_vs_separate(net, task, train, cfg, optim, params, args.steps)
    rates += [eval_rate(), mining_rate()]
    steps = len(loader(task, train, cfg, cfg.BATCH_SIZE, True, 0))
    mining_pairs = (train.n_images + len(train)) * cands
    eval_pairs = dev.n_images * len(dev)
    phases = (("mining negatives", mining_pairs / ((rates[0] + rates[2]) / 2)),
              (f"{steps} weight steps", steps * shared_ms / 1000),
              ("dev evaluation", eval_pairs / rates[1]))
    total = sum(p[1] for p in phases)
    print(f"ITM demo epoch: {len(train)} captions, {train.n_images} images, {steps} steps of "
          f"{cfg.BATCH_SIZE} samples (3 pairs each); mining {cands} candidates per image and per "
          f"caption = {mining_pairs} pairs; dev {dev.n_images} x {len(dev)} = {eval_pairs} pairs")
    print(f"scoring: mining {rates[0]:.0f} then {rates[2]:.0f} pairs/s, evaluation "
          f"{rates[1]:.0f} pairs/s; weight step {shared_ms:.0f} ms")
    for name, seconds in phases:
        print(f"  {name:<24} {seconds:7.1f} s  {100 * seconds / total:5.1f} % of a hard-negative "
              f"epoch")
    print(f"weight step, each side once {shared_ms:.0f} ms vs three separate pairs "
          f"{separate_ms:.0f} ms ({separate_ms / shared_ms:.2f}x; A B A B, same batches)")


def separate_pairs(batch: dict) -> dict:
    """The batch as before sides were shared: every pair's caption and image stacked."""
    out = dict(batch, txt=batch["txt"][batch["txt_rows"]], img=batch["img"][batch["img_rows"]],
               boxes=batch["boxes"][batch["img_rows"]])
    del out["txt_rows"], out["img_rows"]
    return out


def shared_vs_separate(net, task, train, cfg, optim, params, steps: int):
    """ms per weight step of the same batches, shared and separate, interleaved."""
    import torch

    from core.loop import loader, weight_step
    batches = []
    for batch in loader(task, train, cfg, cfg.BATCH_SIZE, True, 1):
        batches.append(batch)
        if len(batches) == steps:
            break
    times = {"shared": 0.0, "separate": 0.0}
    for _ in range(2):
        for kind in times:
            t = time.perf_counter()
            for batch in batches:
                b = batch if kind == "shared" else separate_pairs(batch)
                weight_step(net, task, b, optim, params, cfg, torch.device("cpu"))
            times[kind] += (time.perf_counter() - t) / (2 * len(batches))
    return 1000 * times["shared"], 1000 * times["separate"]


if __name__ == "__main__":
    main()
