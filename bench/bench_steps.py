"""Milliseconds per sample and peak memory of the steps that cost GPU/CPU hours.

    python3 bench/bench_steps.py                      # VQA, VGD; B = 8, 32; fp32, bf16
    python3 bench/bench_steps.py --tasks vqa --batch 32 --steps train search_arch

Each row runs in a fresh process (so its peak resident memory is its own), with the same
thread count (--threads, default 2), 2 warm-up iterations and --iters timed ones, on
synthetic batches of the paper's sizes: 14 tokens, 100 regions of 2048-d features, H = 512
for training / evaluation and H = 256 for the search steps, the paper's architectures. Prints
a table and writes JSON to bench/results/steps.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("train", "eval", "search_weight", "search_arch")
ARCH = {"vqa": "arch/mmnas_vqa.json", "vgd": "arch/mmnas_vgd.json"}


def build(task_name: str, step: str, batch_size: int, amp: str):
    """(net, task, batch, step function) for one row."""
    import numpy as np
    import torch

    from core.arch import load_arch
    from core.config import resolve
    from core.loop import autocast, build_net, weight_step
    from core.mixed import Architect, mixed_ops, weight_parameters
    from core.model import fixed_backbone, search_backbone
    from core.tasks.vgd import VGDTask
    from core.tasks.vqa import VQATask

    search = step.startswith("search")
    cfg = resolve(task_name, "search" if search else "train", {"SEED": 0, "AMP": amp})  # paper sizes
    task = (VQATask if task_name == "vqa" else VGDTask)(cfg, lambda m: None)
    task.vocab = {f"w{i}": i for i in range(20000)}
    if task_name == "vqa":
        task.ans_to_ix = {f"a{i}": i for i in range(3129)}
        task.ix_to_ans = list(task.ans_to_ix)
    g = np.random.default_rng(0)
    samples = []
    for _ in range(batch_size):
        k = 100 if task_name == "vgd" else int(g.integers(10, 101))
        xy = g.uniform(0, 400, (k, 2))
        s = {"txt": np.pad(g.integers(3, 20000, 10), (0, 4)),
             "img": np.abs(g.standard_normal((k, 2048))).astype(np.float32),
             "boxes": np.concatenate([xy, xy + g.uniform(10, 200, (k, 2))], 1).astype(np.float32),
             "qid": 0, "sent_id": 0}
        if task_name == "vqa":
            s["ans_idx"], s["ans_score"] = np.array([3, 9]), np.array([1.0, 0.3], np.float32)
        else:
            s["gt"] = np.array([xy[0, 0], xy[0, 1], 100, 100], np.float32)
            s["size"] = np.array([640, 640], np.float32)
        samples.append(s)
    batch = task.collate(samples)
    if search:
        net = build_net(cfg, task, search_backbone(cfg))
    else:
        net = build_net(cfg, task, fixed_backbone(cfg, load_arch(REPO / ARCH[task_name], 0, 12, 18)))
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    if step == "eval":
        net.eval()

        def run():
            with torch.no_grad(), autocast(cfg, cpu):
                net(batch)
        return run
    if step == "search_arch":
        architect = Architect(net, 0.1, (0.0, 0.999), "full")

        def loss():
            with autocast(cfg, cpu):
                return task.loss(net(batch), batch)
        return lambda: architect.step(loss, gen)
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=1e-4)

    def run():
        if search:
            for m in mixed_ops(net):
                m.sample(gen)
        weight_step(net, task, batch, optim, params, cfg, cpu)
    return run


def measure(task: str, step: str, batch: int, amp: str, iters: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = build(task, step, batch, amp)
    for _ in range(2):
        run()
    t = time.perf_counter()
    for _ in range(iters):
        run()
    seconds = (time.perf_counter() - t) / iters
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"task": task, "step": step, "batch": batch, "amp": amp, "threads": threads,
            "ms_per_sample": 1000 * seconds / batch, "samples_per_s": batch / seconds,
            "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["vqa", "vgd"])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:                      # child process: one measurement, JSON on stdout
        task, step, batch, amp = args.row.split(":")
        print(json.dumps(measure(task, step, int(batch), amp, args.iters, args.threads)))
        return
    rows = []
    print(f"{'task':<5} {'step':<14} {'B':>3} {'amp':>5} {'ms/sample':>10} {'samples/s':>10} "
          f"{'peak MB':>8}")
    for task in args.tasks:
        for step in args.steps:
            for batch in args.batch:
                for amp in args.amp:
                    out = subprocess.run(
                        [sys.executable, __file__, "--row", f"{task}:{step}:{batch}:{amp}",
                         "--iters", str(args.iters), "--threads", str(args.threads)],
                        capture_output=True, text=True, check=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{task:<5} {step:<14} {batch:>3} {amp:>5} {row['ms_per_sample']:>10.1f} "
                          f"{row['samples_per_s']:>10.1f} {row['peak_rss_mb']:>8.0f}", flush=True)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "steps.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written {out_dir / 'steps.json'}")


if __name__ == "__main__":
    main()
