"""Ours vs the original MMNas code (github.com/MILVLG/mmnas), same machine, same run.

    python3 bench/bench_original.py --original ~/src/mmnas              # B = 32, 2 threads
    python3 bench/bench_original.py --original ~/src/mmnas --steps train eval --batch 8
    python3 bench/bench_original.py --original ~/src/mmnas --iters 1 --warmup 1 --threads 1 \\
        --batch 2                                                       # a quick try

The original's code is not part of this project: ``--original`` names a checkout of
MILVLG/mmnas, whose networks are imported from there (``mmnas.model.full_vqa.Net_Full``,
``mmnas.model.hygr_vqa.Net_Search``, ``mmnas.model.mixed.MixedOp``,
``mmnas.utils.optimizer.WarmupOptimizer``); nothing of it is copied here. Only those model
modules are imported, never its scripts (train_vqa.py / search_vqa.py start NCCL process
groups, set CUDA_VISIBLE_DEVICES and import tkinter, torchvision and spaCy's GloVe vectors),
so the bench runs on a CPU. Its model code itself has no ``.cuda()`` and no ``torch.cuda``
call: all four steps below build and run on a CPU.

Rows, VQA, CPU, fp32, in train mode (dropout 0.1) except ``eval``; the sizes of
bench/bench_steps.py (14 tokens, 10-100 regions of 2048-d features padded to the batch's
largest, 3,129 answers, a 20,000-word vocabulary; H = 512 for train / eval with the paper's
architecture arch/mmnas_vqa.json, H = 256 for the search supernet, 12 encoder and 18 decoder
blocks):

  train          ours: bench_steps.build's step (weight_step: BCE-sum loss, backward, clip
                 1.0, Adam). Original: the body of train_vqa.py's loop on Net_Full with the
                 same GENOTYPE: zero_grad, forward, BCEWithLogitsLoss(reduction='sum'),
                 ``loss += 0 * sum(p.sum())`` over all parameters, backward,
                 clip_grad_norm_(1.0), WarmupOptimizer(Adam(betas (0.9, 0.98), eps 1e-9)).
  eval           forward without gradient, eval mode, both.
  search_weight  ours: one path sampled per block, weight step. Original: search_vqa.py's
                 network step on Net_Search: MixedOp.MODE = None, reset_binary_gates (one
                 sampled path), unused_modules_off, forward, BCE-sum, the ``0 * sum`` terms,
                 backward, clip 1.0 on net_parameters, WarmupOptimizer step,
                 unused_modules_back.
  search_arch    ours: Architect.step ('full' binary gates). Original: search_vqa.py's
                 architecture step: MixedOp.MODE = 'full', reset_binary_gates,
                 unused_modules_off, forward (inactive candidates run with autograd and are
                 detached), backward, set_arch_param_grad, Adam(alpha, lr 0.1, betas
                 (0, 0.999)) step, unused_modules_back.

Both networks of a row are built from our resolved config (the original's ``__C`` is a
namespace of the attributes its modules read, with the values of its train_vqa.py /
search_vqa.py: LAYERS 1, OPS_NORM / OPS_RESIDUAL on, no box features, GloVe-size
embeddings, ALPHA_INIT_TYPE 'normal'), and take the same synthetic batch: the one
bench_steps.build makes (same generator seed). The original's forward takes
``(frcn_feat, bbox_feat, rel_img, ques_ix, rel_ques)``: frcn_feat and ques_ix are our
``img`` and ``txt`` tensors (so both derive the same masks from the zero padding), rel_img
is the [B, N, N, 4] box relation (our core.relations.image_relation: the formula of the
original loader's relation_embedding, zero at padding), rel_ques a [B, 14, 14, 3] word
relation (read by the search net's unused linear_x_rel only) and bbox_feat zeros (unused:
BBOX_FEATURE is False in its configs). The original computes these relations per sample in
its DataLoader workers, outside the step; ours computes the box relation inside the forward,
so the ours column pays for it and the original's does not. Left out of the original's step:
DDP (one process here), ``loss.item()``, logging.

Before timing, the original's weights are loaded into ours (utils.checkpoint.load_weights,
which maps released checkpoints) and both run one eval-mode forward on the batch (the search
nets on the arg-max path): the largest logit difference is printed, so the rows time the
same function. Each row warms both up (--warmup), then alternates ours / original for
--iters timed iterations (A B A B ...), in one process and one thread setting (and one
malloc setting, ``--allocator``: it is the process's, so the original's step is timed under
ours too unless ``--allocator system``; the scripts of this project set ``keep``). Prints a
table (ms per sample and the original / ours ratio), the parameter counts of both networks,
and writes JSON to bench/results/original.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import bench_steps  # noqa: E402

STEPS = bench_steps.STEPS
# What the bench imports from the checkout (and what those modules import in turn).
REQUIRED = ("mmnas/model/full_vqa.py", "mmnas/model/hygr_vqa.py", "mmnas/model/mixed.py",
            "mmnas/model/modules.py", "mmnas/utils/ops_adapter.py", "mmnas/utils/optimizer.py")
ORIGINAL_ANSWERS = 3129
EPOCH_STEPS = 1000          # WarmupOptimizer's epoch length: only sets which warm-up lr is used


def missing_file(path: Path) -> str | None:
    """The first file of REQUIRED that ``path`` lacks (or a sentence if it is no folder)."""
    if not path.is_dir():
        return f"{REQUIRED[0]} (no folder {path})"
    for rel in REQUIRED:
        if not (path / rel).is_file():
            return rel
    return None


def import_original(path: Path) -> SimpleNamespace:
    """The original's classes, imported from the checkout at ``path``."""
    import importlib
    path = path.resolve()
    loaded = sys.modules.get("mmnas")
    if loaded is not None and not any(Path(p).resolve() == path / "mmnas"
                                      for p in getattr(loaded, "__path__", [])):
        raise RuntimeError(f"another 'mmnas' is already imported ({list(loaded.__path__)})")
    sys.path.insert(0, str(path))
    try:
        full = importlib.import_module("mmnas.model.full_vqa")
        hygr = importlib.import_module("mmnas.model.hygr_vqa")
        mixed = importlib.import_module("mmnas.model.mixed")
        optimizer = importlib.import_module("mmnas.utils.optimizer")
        adapter = importlib.import_module("mmnas.utils.ops_adapter")
    finally:
        sys.path.remove(str(path))
    for module in (full, hygr, mixed, optimizer, adapter):
        if path not in Path(module.__file__).resolve().parents:
            raise RuntimeError(f"{module.__name__} came from {module.__file__}, not {path}")
    return SimpleNamespace(Net_Full=full.Net_Full, Net_Search=hygr.Net_Search,
                           MixedOp=mixed.MixedOp, WarmupOptimizer=optimizer.WarmupOptimizer,
                           used_ops=adapter.OpsAdapter().Used_OPS)


def checkout_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def original_cfg(cfg, genotype: dict | None) -> SimpleNamespace:
    """The original's ``__C``: the attributes its model modules read, sized from ours."""
    return SimpleNamespace(
        HSIZE=cfg.HSIZE, DROPOUT_R=cfg.DROPOUT_R, REL_SIZE=cfg.REL_SIZE,
        WORD_EMBED_SIZE=cfg.WORD_EMBED_SIZE, FRCNFEAT_SIZE=cfg.IMG_FEAT_SIZE,
        BBOX_FEATURE=False, BBOXFEAT_EMB_SIZE=2048, LAYERS=1, OPS_NORM=True, OPS_RESIDUAL=True,
        ATTFLAT_GLIMPSES=cfg.FLAT_GLIMPSES, ATTFLAT_OUT_SIZE=2 * cfg.HSIZE,
        ATTFLAT_MLP_SIZE=cfg.FLAT_MLP_SIZE, GENOTYPE=genotype,
        NODES={"enc": cfg.ENC_BLOCKS, "dec": cfg.DEC_BLOCKS}, ALPHA_INIT_TYPE="normal")


def our_batch(cfg, batch_size: int) -> dict:
    """The batch bench_steps.build times ours on (same task setup, same generator seed)."""
    from core.tasks.vqa import VQATask
    task = VQATask(cfg, lambda m: None)
    task.vocab = {f"w{i}": i for i in range(20000)}
    task.ans_to_ix = {f"a{i}": i for i in range(ORIGINAL_ANSWERS)}
    task.ix_to_ans = list(task.ans_to_ix)
    batches, _ = bench_steps.make_batches(task, "vqa", batch_size, "none",
                                          np.random.default_rng(0))
    return batches[0]


def original_inputs(batch: dict, cfg) -> tuple:
    """The original's forward input from our batch (see the module docstring)."""
    import torch

    from core.model import region_padding
    from core.relations import image_relation, text_relation
    img, txt = batch["img"], batch["txt"]
    b, n, _ = img.shape
    rel_img = image_relation(batch["boxes"], region_padding(img))
    words = torch.randn(b, txt.size(1), cfg.WORD_EMBED_SIZE,
                        generator=torch.Generator().manual_seed(0))
    rel_ques = text_relation(words, txt == 0)
    return img, torch.zeros(b, n, 5), rel_img, txt, rel_ques


def build_original(orig, step: str, cfg, batch: dict):
    """(net, step function) of the original for one row."""
    import torch
    from torch import nn
    search = step.startswith("search")
    genotype = None if search else \
        json.loads((REPO / bench_steps.ARCH["vqa"]).read_text())["epoch0"]
    ocfg = original_cfg(cfg, genotype)
    init = {"token_size": 20000, "ans_size": ORIGINAL_ANSWERS,
            "pretrained_emb": np.random.default_rng(1).standard_normal(
                (20000, cfg.WORD_EMBED_SIZE)).astype(np.float32)}
    net = (orig.Net_Search if search else orig.Net_Full)(ocfg, init)
    net.train()
    inputs, target = original_inputs(batch, cfg), batch["target"]
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")

    if step == "eval":
        net.eval()

        def run():
            with torch.no_grad():
                net(inputs)
        return net, inputs, run

    def adam(params, lr_base):
        return orig.WarmupOptimizer(lr_base, torch.optim.Adam(
            params, lr=0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0), EPOCH_STEPS, True)

    if step == "train":                                   # train_vqa.py
        optim = adam(net.parameters(), 1.2e-4)

        def run():
            optim.zero_grad()
            loss = loss_fn(net(inputs), target)
            loss += 0 * sum(p.sum() for p in net.parameters())
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optim.step()
        return net, inputs, run

    mixed = orig.MixedOp                                  # search_vqa.py
    if step == "search_weight":
        optim = adam(net.net_parameters(), 4e-4)

        def run():
            mixed.MODE = None
            net.reset_binary_gates()
            net.unused_modules_off()
            loss = loss_fn(net(inputs), target)
            loss += 0 * sum(p.sum() for p in net.alpha_prob_parameters())
            loss += 0 * sum(p.sum() for p in net.alpha_gate_parameters())
            loss += 0 * sum(p.sum() for p in net.net_parameters())
            net.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.net_parameters(), 1.0)
            optim.step()
            net.unused_modules_back()
        return net, inputs, run

    alpha_optim = torch.optim.Adam(net.alpha_prob_parameters(), 0.1, betas=(0.0, 0.999),
                                   weight_decay=0)

    def run():
        mixed.MODE = "full"
        net.reset_binary_gates()
        net.unused_modules_off()
        loss = loss_fn(net(inputs), target)
        loss += 0 * sum(p.sum() for p in net.alpha_prob_parameters())
        loss += 0 * sum(p.sum() for p in net.net_parameters())
        net.zero_grad()
        loss.backward()
        net.set_arch_param_grad()
        alpha_optim.step()
        net.unused_modules_back()
        mixed.MODE = None
    return net, inputs, run


def same_function(ours, theirs, orig, batch: dict, inputs: tuple) -> float | str:
    """Load the original's weights into ours; the largest eval-mode logit difference on
    ``batch`` (search nets: the arg-max path), or why it could not be compared."""
    import torch

    from core.mixed import mixed_ops
    from core.tasks.vqa import VQATask
    from utils.checkpoint import CheckpointError, load_weights
    try:
        load_weights(ours, theirs.state_dict(), "the original's network",
                     VQATask.original_key_prefixes)
    except CheckpointError as e:
        return f"n/a ({e})"
    modes = (ours.training, theirs.training)
    ours.eval(), theirs.eval()
    try:
        if hasattr(theirs, "set_chosen_op_active"):
            orig.MixedOp.MODE = None
            theirs.set_chosen_op_active()
            for m in mixed_ops(ours):
                m.choose_argmax()
        with torch.no_grad():
            return float((ours(batch) - theirs(inputs)).abs().max())
    finally:
        ours.train(modes[0]), theirs.train(modes[1])


def n_params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def measure_pair(orig, step: str, batch_size: int, iters: int, warmup: int, threads: int,
                 overrides: dict | None = None) -> dict:
    """One row: ours and the original's step on the same batch, timed alternately."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours, cfg, run_ours, _ = bench_steps.build("vqa", step, batch_size, "off", "none", "cpu",
                                               overrides)
    batch = our_batch(cfg, batch_size)
    torch.manual_seed(0)
    theirs, inputs, run_theirs = build_original(orig, step, cfg, batch)
    notes = []
    if step.startswith("search"):
        for side in ("enc", "dec"):
            if list(getattr(cfg, f"{side.upper()}_CANDIDATES")) != orig.used_ops[f"{side}_safe"]:
                notes.append(f"{side} candidates differ: ours "
                             f"{list(getattr(cfg, f'{side.upper()}_CANDIDATES'))}, original "
                             f"{orig.used_ops[f'{side}_safe']}")
    diff = same_function(ours, theirs, orig, batch, inputs)
    if step == "eval":
        ours.eval()
    torch.manual_seed(0)
    for _ in range(warmup):
        run_ours()
        run_theirs()
    times = {"ours": [], "original": []}
    for _ in range(iters):
        for name, run in (("ours", run_ours), ("original", run_theirs)):
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    ms = {k: 1000 * sum(v) / len(v) / batch_size for k, v in times.items()}
    p_ours, p_theirs = n_params(ours), n_params(theirs)
    return {"task": "vqa", "step": step, "batch": batch_size, "threads": threads,
            "iters": iters, "warmup": warmup, "hsize": cfg.HSIZE,
            "regions": int(batch["img"].shape[1]), "tokens": int(batch["txt"].shape[1]),
            "ms_per_sample_ours": ms["ours"], "ms_per_sample_original": ms["original"],
            "original_over_ours": ms["original"] / ms["ours"],
            "seconds_ours": times["ours"], "seconds_original": times["original"],
            "params_ours": p_ours, "params_original": p_theirs,
            "params_rel_diff": (p_theirs - p_ours) / p_ours,
            "max_abs_logit_diff": diff, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", required=True, type=Path,
                    help="a checkout of github.com/MILVLG/mmnas (its mmnas/ package is "
                         "imported from there)")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--batch", nargs="+", type=int, default=[32])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides (both networks), e.g. HSIZE=64 FLAT_MLP_SIZE=64")
    ap.add_argument("--allocator", default="keep", choices=["keep", "system"],
                    help="the process's malloc, for both networks: keep (glibc keeps freed "
                         "memory, as our scripts set it; utils/allocator.py) or system")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "original.json"))
    args = ap.parse_args()
    if args.allocator == "keep":
        from utils.allocator import keep_freed_memory
        print(f"allocator: {keep_freed_memory()} (both networks: one process)")
    missing = missing_file(args.original)
    if missing:
        ap.error(f"--original {args.original} does not look like a checkout of "
                 f"MILVLG/mmnas: missing {missing}")
    orig = import_original(args.original)
    commit = checkout_commit(args.original)
    rows = []
    print(f"original: {args.original.resolve()}" + (f" @ {commit}" if commit else ""))
    print(f"{'step':<14} {'B':>3} {'ms/sample ours':>15} {'ms/sample original':>19} "
          f"{'original/ours':>14}", flush=True)
    for step in args.steps:
        for batch in args.batch:
            row = measure_pair(orig, step, batch, args.iters, args.warmup, args.threads,
                               bench_steps.overrides(args.set))
            row.update(original=str(args.original.resolve()), original_commit=commit,
                       allocator=args.allocator)
            rows.append(row)
            print(f"{step:<14} {batch:>3} {row['ms_per_sample_ours']:>15.2f} "
                  f"{row['ms_per_sample_original']:>19.2f} "
                  f"{row['original_over_ours']:>13.2f}x", flush=True)
            bench_steps.write_rows(rows, Path(args.out))     # kept if a later row fails
    print(f"\nCPU fp32, {args.threads} thread(s), {args.warmup} warm-up + {args.iters} timed "
          f"iterations per network, alternating ours / original")
    print(f"{'step':<14} {'H':>4} {'regions':>7} {'params ours':>12} {'params original':>16} "
          f"{'diff':>7}  max |logit diff| (same weights, eval)")
    for r in rows:
        diff = r["max_abs_logit_diff"]
        diff = f"{diff:.2e}" if isinstance(diff, float) else diff
        print(f"{r['step']:<14} {r['hsize']:>4} {r['regions']:>7} {r['params_ours']:>12,} "
              f"{r['params_original']:>16,} {100 * r['params_rel_diff']:>6.3f}%  {diff}")
        for note in r["notes"]:
            print(f"  note: {note}")
        if abs(r["params_rel_diff"]) > 0.01:
            print(f"  warning: parameter counts differ by more than 1 % ({r['step']})")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
