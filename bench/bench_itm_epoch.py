"""Where one ITM demo training epoch spends its time: mining hard negatives (``score_pairs``
over every image's and every caption's candidates), the weight steps, the dev evaluation.

    python3 bench/bench_itm_epoch.py                    # the demo config, untrained weights
    python3 bench/bench_itm_epoch.py --set ITM_NEG_CANDIDATES=8 --steps 20

One process, one phase after the other (mining, steps, evaluation, mining again: the two
mining rows show how much the machine's load moved meanwhile), then the weight step with each
caption's and image's side computed once against the three pairs computed separately. The weights are untrained;
the cost of each phase does not depend on them. Prints seconds per phase and the share of a
whole epoch (mining + all of the epoch's steps + evaluation), extrapolating the steps from
``--steps`` timed ones.
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
    ap.add_argument("--steps", type=int, default=10, help="weight steps to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. ITM_NEG_CANDIDATES=8")
    args = ap.parse_args()
    import torch
    import yaml

    from core.loop import evaluate, loader, weight_step
    from core.mixed import weight_parameters

    torch.set_num_threads(args.threads)
    cfg, task, net = setup({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    cpu = torch.device("cpu")
    train, dev = task.dataset("train"), task.dataset(cfg.EVAL_SPLIT.split(",")[0])
    hard_epoch = cfg.ITM_HARD_NEG_EPOCH

    def mine():
        t = time.perf_counter()
        task.start_epoch(net, train, hard_epoch, cpu)
        return time.perf_counter() - t

    mining = mine()
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=cfg.LR_BASE)
    batches = loader(task, train, cfg, cfg.BATCH_SIZE, True, 0)
    net.train()
    t, done = time.perf_counter(), 0
    for done, batch in enumerate(batches, 1):
        weight_step(net, task, batch, optim, params, cfg, cpu)
        if done == args.steps:
            break
    step = (time.perf_counter() - t) / done
    t = time.perf_counter()
    evaluate(net, task, dev, cfg, cpu, "dev")
    evaluation = time.perf_counter() - t
    mining_again = mine()
    shared_ms, separate_ms = shared_vs_separate(net, task, train, cfg, optim, params, args.steps)
    steps = step * len(batches)
    total = (mining + mining_again) / 2 + steps + evaluation
    print(f"ITM demo epoch: {len(train)} captions, {train.n_images} images, "
          f"{len(batches)} steps of {cfg.BATCH_SIZE}; {cfg.ITM_NEG_CANDIDATES} candidates; "
          f"dev {dev.n_images} x {len(dev)} pairs")
    for name, seconds in (("mining negatives", mining), (f"{len(batches)} weight steps "
                          f"({1000 * step:.0f} ms each)", steps), ("dev evaluation", evaluation),
                          ("mining negatives again", mining_again)):
        print(f"  {name:<36} {seconds:7.1f} s  {100 * seconds / total:5.1f} %")
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
