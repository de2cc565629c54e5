"""Milliseconds per sample and peak memory of the steps that cost GPU/CPU hours.

    python3 bench/bench_steps.py                      # VQA, VGD; B = 8, 32; fp32, bf16
    python3 bench/bench_steps.py --tasks vqa --batch 32 --steps train search_arch
    python3 bench/bench_steps.py --tasks itm --steps train   # ITM: 3 pairs per sample
    python3 bench/bench_steps.py --tasks vqa --steps train --bucket off on    # length bucketing
    python3 bench/bench_steps.py --tasks vqa --steps train --compile off on --warmup 5
    python3 bench/bench_steps.py --tasks vqa --steps train --allocator system keep
    python3 bench/bench_steps.py --tasks vqa --batch 32 --steps search_arch --profile 12
    python3 bench/bench_steps.py --device cuda ...    # on a GPU (bench/gpu.sh runs them all)

Each row runs in a fresh process (so its peak resident memory is its own), with the same
thread count (--threads, default 2), 2 warm-up iterations and --iters timed ones, on
synthetic batches of the paper's sizes: 14 tokens, 100 regions of 2048-d features, H = 512
for training / evaluation and H = 256 for the search steps, the paper's architectures (ITM: 50
tokens, 36 regions, a negative caption and image per sample). ``--bucket off|on`` rows step
through the first 4 batches of a pool of VQA samples of 10-100 regions, in shuffled or
bucketed order, and report the padded region rows per sample of the whole pool.
``--allocator keep`` (the default, as the scripts run) sets glibc's malloc to keep freed
memory (utils/allocator.py); ``system`` leaves it as it is. Each row also
counts the step's FLOPs (torch.utils.flop_counter) and the fraction of ``--peak-tflops``
reached. Prints a table and writes JSON to bench/results/steps.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("train", "eval", "search_weight", "search_arch")
ARCH = {"vqa": "arch/mmnas_vqa.json", "vgd": "arch/mmnas_vgd.json", "itm": "arch/mmnas_itm.json"}
POOL_BATCHES = 20      # bucket rows: batches drawn from a pool of this many batches' samples


def region_counts(task_name: str, n: int, g):
    """VQA: 10-100 regions (the adaptive bottom-up features); VGD 100, ITM 36 (fixed)."""
    if task_name == "vqa":
        return g.integers(10, 101, n)
    return [100 if task_name == "vgd" else 36] * n


def make_sample(task_name: str, k: int, g) -> dict:
    """One synthetic sample of ``k`` regions in the task's collate format."""
    def regions(k):
        xy = g.uniform(0, 400, (k, 2))
        return (np.abs(g.standard_normal((k, 2048))).astype(np.float32),
                np.concatenate([xy, xy + g.uniform(10, 200, (k, 2))], 1).astype(np.float32))

    img, boxes = regions(k)
    tokens = 50 if task_name == "itm" else 14
    s = {"txt": np.pad(g.integers(3, 20000, tokens - 4), (0, 4)), "img": img, "boxes": boxes,
         "qid": 0, "sent_id": 0, "caption_id": 0}
    if task_name == "vqa":
        s["ans_idx"], s["ans_score"] = np.array([3, 9]), np.array([1.0, 0.3], np.float32)
    elif task_name == "vgd":
        s["gt"] = np.array([boxes[0, 0], boxes[0, 1], 100, 100], np.float32)
        s["size"] = np.array([640, 640], np.float32)
    else:                          # ITM: a negative caption and a negative image per sample
        s["neg_txt"] = np.pad(g.integers(3, 20000, tokens - 4), (0, 4))
        s["neg_img"], s["neg_boxes"] = regions(k)
    return s


def make_batches(task, task_name: str, batch_size: int, bucket: str, g) -> tuple[list, float]:
    """(batches, padded region rows per sample). ``bucket`` 'none': one batch of random
    region counts; 'off' / 'on': the first batches of a pool, in shuffled / bucketed order."""
    from core.data.bucketing import BucketBatches, padded_slots
    from core.loop import RankBatches
    if bucket == "none":
        counts = region_counts(task_name, batch_size, g)
        order = [list(range(batch_size))]
    else:
        counts = region_counts(task_name, batch_size * POOL_BATCHES, g)
        sampler = BucketBatches(counts, batch_size, 0, 0, 1) if bucket == "on" else \
            RankBatches(len(counts), batch_size, True, 0)
        order = list(sampler)
    padding = padded_slots(np.asarray(counts), [np.asarray(b) for b in order])
    return [task.collate([make_sample(task_name, int(counts[i]), g) for i in b])
            for b in order[:4]], padding


def build(task_name: str, step: str, batch_size: int, amp: str, bucket: str = "none",
          device: str = "cpu", overrides: dict | None = None):
    """(net, cfg, step function, padded rows per sample) for one row."""
    import torch

    from core.arch import load_arch
    from core.config import resolve
    from core.loop import autocast, build_net, to_device, weight_step
    from core.mixed import Architect, mixed_ops, weight_parameters
    from core.model import fixed_backbone, search_backbone
    from core.tasks.itm import ITMTask
    from core.tasks.vgd import VGDTask
    from core.tasks.vqa import VQATask

    search = step.startswith("search")
    cfg = resolve(task_name, "search" if search else "train",
                  {"SEED": 0, "AMP": amp, "COMPILE": "on", **(overrides or {})})  # paper sizes
    task = {"vqa": VQATask, "vgd": VGDTask, "itm": ITMTask}[task_name](cfg, lambda m: None)
    task.vocab = {f"w{i}": i for i in range(20000)}
    if task_name == "vqa":
        task.ans_to_ix = {f"a{i}": i for i in range(3129)}
        task.ix_to_ans = list(task.ans_to_ix)
    dev = torch.device(device)
    batches, padding = make_batches(task, task_name, batch_size, bucket, np.random.default_rng(0))
    batches = [to_device(b, dev) for b in batches]
    if search:
        net = build_net(cfg, task, search_backbone(cfg))
    else:
        net = build_net(cfg, task, fixed_backbone(cfg, load_arch(REPO / ARCH[task_name], 0,
                                                                 cfg.ENC_BLOCKS, cfg.DEC_BLOCKS)))
    net.to(dev)
    gen = torch.Generator().manual_seed(0)
    turn = iter(range(10**9))

    def next_batch():
        return batches[next(turn) % len(batches)]

    if step == "eval":
        net.eval()

        def run():
            with torch.no_grad(), autocast(cfg, dev):
                net(next_batch())
        return net, cfg, run, padding
    if step == "search_arch":
        architect = Architect(net, 0.1, (0.0, 0.999), "full")

        def loss():
            batch = next_batch()
            with autocast(cfg, dev):
                return task.loss(net(batch), batch)
        return net, cfg, lambda: architect.step(loss, gen), padding
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=1e-4)

    def run():
        if search:
            for m in mixed_ops(net):
                m.sample(gen)
        weight_step(net, task, next_batch(), optim, params, cfg, dev)
    return net, cfg, run, padding


def step_flops(run) -> int:
    """Floating-point operations of one step (matrix products and convolutions, forward and
    backward), counted by torch.utils.flop_counter on an eager run."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def top_ops(run, n: int, cuda: bool) -> list[dict]:
    """The ``n`` operators of one more step with the most self time (torch.profiler), each
    with its share of the step's self time: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        run()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages()     # operators, not annotated regions
              if getattr(e, key) > 0 and "#" not in e.key]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: -getattr(e, key))
    return [{"op": e.key, "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total,
             "calls": e.count} for e in events[:n]]


def measure(task: str, step: str, batch: int, amp: str, iters: int, threads: int,
            compiled: str = "off", bucket: str = "none", device: str = "cpu",
            warmup: int = 2, peak_tflops: float = 989.0, overrides: dict | None = None,
            allocator: str = "keep", profile: int = 0) -> dict:
    import torch

    from core.compile import compile_counters, compile_net
    from utils.allocator import keep_freed_memory
    if allocator == "keep":
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, cfg, run, padding = build(task, step, batch, amp, bucket, device, overrides)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flops = step_flops(run)
    if compiled == "on":
        compile_net(net, cfg, torch.device(device), lambda m: print(m, file=sys.stderr))
    t = time.perf_counter()
    for _ in range(warmup):            # compiled: includes the compilation
        run()
    sync()
    warmup_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    seconds = (time.perf_counter() - t) / iters
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda else
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    top = top_ops(run, profile, cuda) if profile else []
    return {"task": task, "step": step, "batch": batch, "amp": amp, "compile": compiled,
            "bucket": bucket, "allocator": allocator, "device": device, "threads": threads,
            "ms_per_sample": 1000 * seconds / batch, "samples_per_s": batch / seconds,
            "peak_mb": peak_mb, "padded_rows_per_sample": padding,
            "tflops": flops / seconds / 1e12, "peak_fraction": flops / seconds / 1e12 / peak_tflops,
            "warmup_s": warmup_s, "top_ops": top, **({"compile_counters": compile_counters()}
                                     if compiled == "on" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["vqa", "vgd"], choices=sorted(ARCH))
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16", "fp16"])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                    help="eager and/or torch.compile (core/compile.py)")
    ap.add_argument("--bucket", nargs="+", default=["none"], choices=["none", "off", "on"],
                    help="none: one batch; off/on: batches of a pool, shuffled / bucketed by "
                         "region count (VQA's 10-100 regions; other tasks have fixed counts)")
    ap.add_argument("--allocator", nargs="+", default=["keep"], choices=["keep", "system"],
                    help="keep: glibc's malloc keeps freed memory, as the scripts set it "
                         "(utils/allocator.py); system: left as it is")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more step and print its N operators "
                         "with the most self time")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the device's dense bf16 peak, for the fraction column (H100/H200: 989)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for smaller tries, e.g. HSIZE=64 FLAT_MLP_SIZE=64")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "steps.json"))
    ap.add_argument("--in-process", action="store_true",
                    help="every row in this process (GPU: peak memory is reset per row; "
                         "saves the start-up of a process per row)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process and len(args.allocator) > 1:
        ap.error("--allocator sets the whole process: give one with --in-process")
    if args.row:                      # child process: one measurement, JSON on stdout
        task, step, batch, amp, compiled, bucket, allocator = args.row.split(":")
        print(json.dumps(measure(task, step, int(batch), amp, args.iters, args.threads,
                                 compiled, bucket, args.device, args.warmup, args.peak_tflops,
                                 overrides(args.set), allocator, args.profile)))
        return
    rows = []
    print(f"{'task':<5} {'step':<14} {'B':>3} {'amp':>5} {'comp':>4} {'bucket':>6} "
          f"{'ms/sample':>10} {'samples/s':>10} {'peak MB':>8} {'pad/smp':>7} {'TFLOPS':>7} "
          f"{'of peak':>7} {'malloc':>6}")
    for task in args.tasks:
        for step in args.steps:
            for batch in args.batch:
                for amp in args.amp:
                    for compiled in args.compile:
                        for bucket in args.bucket:
                            if bucket != "none" and task != "vqa":
                                continue
                            for allocator in args.allocator:
                                rows.append(run_row(args, task, step, batch, amp, compiled,
                                                    bucket, allocator))
                                write_rows(rows, Path(args.out))  # kept if a later row hangs
    print(f"written {args.out}")


def write_rows(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


def overrides(pairs: list[str]) -> dict:
    import yaml
    return {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}


def run_row(args, task, step, batch, amp, compiled, bucket, allocator) -> dict:
    """One row in a fresh process (its peak memory is its own) unless --in-process; printed
    as it comes."""
    if args.in_process:
        row = in_process_row(args, task, step, batch, amp, compiled, bucket, allocator)
    else:
        row = child_row(args, task, step, batch, amp, compiled, bucket, allocator)
    if "error" in row:
        print(f"{task} {step} B={batch} {amp} compile={compiled} bucket={bucket} "
              f"allocator={allocator}: failed: "
              f"{row['error'].strip().splitlines()[-1] if row['error'].strip() else '?'}",
              flush=True)
        return row
    print(f"{task:<5} {step:<14} {batch:>3} {amp:>5} {compiled:>4} {bucket:>6} "
          f"{row['ms_per_sample']:>10.2f} {row['samples_per_s']:>10.1f} {row['peak_mb']:>8.0f} "
          f"{row['padded_rows_per_sample']:>7.1f} {row['tflops']:>7.2f} "
          f"{100 * row['peak_fraction']:>6.2f}% {row['allocator']:>6}", flush=True)
    for op in row.get("top_ops", []):
        print(f"      {op['op']:<32} {op['self_ms']:9.1f} ms {100 * op['share']:5.1f} % "
              f"({op['calls']} calls)", flush=True)
    return row


def in_process_row(args, task, step, batch, amp, compiled, bucket, allocator) -> dict:
    import traceback

    import torch
    try:
        row = measure(task, step, batch, amp, args.iters, args.threads, compiled, bucket,
                      args.device, args.warmup, args.peak_tflops, overrides(args.set),
                      allocator, args.profile)
    except Exception:                                    # noqa: BLE001 (a row, not the bench)
        row = {"error": traceback.format_exc()}
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"task": task, "step": step, "batch": batch, "amp": amp, "compile": compiled,
            "bucket": bucket, "allocator": allocator, **row}


def child_row(args, task, step, batch, amp, compiled, bucket, allocator) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--row",
         f"{task}:{step}:{batch}:{amp}:{compiled}:{bucket}:{allocator}",
         "--iters", str(args.iters), "--threads", str(args.threads), "--device", args.device,
         "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops),
         "--profile", str(args.profile),
         "--set", *args.set],
        capture_output=True, text=True)
    if out.returncode != 0:
        return {"task": task, "step": step, "batch": batch, "amp": amp, "compile": compiled,
                "bucket": bucket, "allocator": allocator,
                "error": out.stderr[-2000:] or f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
