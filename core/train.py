"""Training a found architecture, and evaluating it (``--RUN=val``) or answering a test split."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from core import pictures, records
from core.arch import Arch, load_arch, parse_arch
from core.compile import compile_net
from core.loop import (build_net, checkpoint_payload, evaluate, format_metrics, grad_scaler,
                       load_checked, resume_state, run_epoch)
from core.model import fixed_backbone
from core.run import device_of, ensure_data
from utils import dist
from utils.checkpoint import CheckpointError, load_weights, rng_state
from utils.io import atomic_write_json


def run_train(cfg, task, run) -> dict:
    device = device_of(cfg, run.log)
    ensure_data(cfg, task, run.log)
    # Evaluating a checkpoint: its embedding replaces any word vectors, so none are read.
    task.prepare(word_vectors=cfg.RUN_MODE == "train" or not cfg.CKPT_PATH)
    ckpt_path, continues = _checkpoint_to_load(cfg, run)
    ckpt = load_checked(ckpt_path, task, run.log) if ckpt_path else None
    arch = _architecture(cfg, ckpt, ckpt_path)
    run.log(f"architecture: enc {' '.join(arch.enc)}\n              dec {' '.join(arch.dec)}")
    net = build_net(cfg, task, fixed_backbone(cfg, arch)).to(device)
    compile_net(net, cfg, device, run.log)
    run.log(f"parameters: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M")
    if ckpt is not None:
        load_weights(net, ckpt["state_dict"], str(ckpt_path), task.original_key_prefixes)
        run.log(f"weights loaded from {ckpt_path}")
    if cfg.RESUME:
        run.save_config(cfg)            # the resumed run's config, now that it has loaded
    if cfg.RUN_MODE == "train":
        return _train(cfg, task, run, net, arch, ckpt if continues else None, device)
    if ckpt is None:
        run.log(f"warning: --RUN={cfg.RUN_MODE} without --CKPT_PATH evaluates untrained weights")
    splits = cfg.EVAL_SPLIT if cfg.RUN_MODE == "val" else cfg.TEST_SPLIT
    datasets = {split: task.dataset(split) for split in splits.split(",")}
    run.work_starts()
    results = {}
    for split, dataset in datasets.items():
        metrics, predictions = evaluate(net, task, dataset, cfg, device, desc=split)
        name = f"{split}{checkpoint_tag(ckpt, ckpt_path)}"
        out = task.write_predictions(predictions, run.folder, name) if dist.is_main() else None
        run.log(f"{split}: {format_metrics(metrics) if metrics else 'no labels'}; "
                f"predictions -> {out}")
        if metrics:
            results[split] = metrics
    if results and dist.is_main():
        atomic_write_json(run.folder / f"metrics_{cfg.RUN_MODE}.json", results)
    return results


def checkpoint_tag(ckpt: dict | None, path: Path | None) -> str:
    """What result files add to the split's name to say which checkpoint answered:
    ``_<VERSION>_epoch<N>`` of ours (``result_test_t1_epoch13.json``), ``_<file name>`` of
    a released one, nothing for untrained weights."""
    if ckpt is None:
        return ""
    version = (ckpt.get("config") or {}).get("VERSION")
    if version and isinstance(ckpt.get("epoch"), int):
        return f"_{version}_epoch{ckpt['epoch']}"
    return f"_{Path(path).stem}"


def _checkpoint_to_load(cfg, run) -> tuple[Path | None, bool]:
    """(checkpoint, whether the run continues from it).

    ``--RESUME`` continues from the run folder's newest intact checkpoint, or from
    ``--CKPT_PATH`` when that names one of the folder's own checkpoints. Any other
    ``CKPT_PATH`` (saved in config.yaml) holds the weights the run started from: a resume
    must not go back to them, unless the folder has no checkpoint yet (killed before its
    first), in which case the run starts again from them.
    """
    given = Path(cfg.CKPT_PATH) if cfg.CKPT_PATH else None
    if cfg.RESUME:
        if given is not None and given.resolve().parent == run.folder.resolve():
            return given, True
        last = run.last_checkpoint()
        if last is not None:
            return last, True
    return given, False


def _architecture(cfg, ckpt, ckpt_path) -> Arch:
    """--ARCH_PATH wins; otherwise the architecture stored in one of our checkpoints."""
    if cfg.ARCH_PATH:
        return load_arch(cfg.ARCH_PATH, cfg.ARCH_EPOCH, cfg.ENC_BLOCKS, cfg.DEC_BLOCKS)
    if ckpt is not None and ckpt.get("arch") and ckpt.get("kind") == "train":
        return parse_arch(ckpt["arch"], f"{ckpt_path} [arch]", cfg.ENC_BLOCKS, cfg.DEC_BLOCKS)
    if ckpt is not None and ckpt.get("kind") == "search":
        raise CheckpointError(f"{ckpt_path} is a search checkpoint; train its architecture "
                              f"with --ARCH_PATH=<search folder>/arch.json --ARCH_EPOCH=N")
    raise CheckpointError("no architecture: pass --ARCH_PATH (e.g. arch/mmnas_vqa.json)")


def _train(cfg, task, run, net, arch, resume_ckpt, device) -> dict:
    params = list(net.parameters())
    scaler = grad_scaler(cfg, device)
    optim = torch.optim.Adam(params, lr=cfg.LR_BASE, betas=tuple(cfg.OPT_BETAS),
                             eps=cfg.OPT_EPS)
    start_epoch, step, history = 0, 0, []
    if resume_ckpt is not None:
        start_epoch, step, outputs = resume_state(resume_ckpt, optim, run)
        history = [r for r in records.history_of(outputs.get("metrics.json"))
                   if r["epoch"] <= start_epoch]
        run.log(f"resuming after epoch {start_epoch}")
    train_set = task.dataset(cfg.TRAIN_SPLIT)
    eval_sets = {}
    if cfg.EVAL_EVERY_EPOCH:
        trained_on = cfg.TRAIN_SPLIT.split("+")
        eval_sets = {s: task.dataset(s) for s in cfg.EVAL_SPLIT.split(",") if s not in trained_on}
    for split, dataset in eval_sets.items():
        baseline = task.baseline(train_set, dataset)
        if baseline:
            run.log(f"baseline on {split}: {format_metrics(baseline)}")
    run.log(f"training on {cfg.TRAIN_SPLIT}: {len(train_set)} samples")
    metrics = history[-1][next(iter(eval_sets))] if history and eval_sets else {}
    run.work_starts()
    log_book = records.Records(run, cfg.TENSORBOARD, kept_until=start_epoch)
    for epoch in range(start_epoch, cfg.MAX_EPOCH):
        t0 = time.time()
        line, step, stats = run_epoch(net, task, train_set, cfg, device, optim, params, scaler,
                                      epoch, step, "train")
        run.log(line)
        # Evaluate before the checkpoint, so that it holds the history up to this epoch.
        if eval_sets:
            record = {"epoch": epoch + 1}
            for split, dataset in eval_sets.items():
                record[split], _ = evaluate(net, task, dataset, cfg, device, desc=split)
                run.log(f"epoch {epoch + 1}: {split} {format_metrics(record[split])}")
            history.append(record)
            metrics = record[next(iter(eval_sets))]
        # Drawn and recorded before the checkpoint: an epoch killed in between is redone.
        pictures.train_epoch(run, epoch + 1, stats["loss"], history[-1] if eval_sets else None,
                             cfg.PICTURES)
        log_book.add(history[-1] if eval_sets else {"epoch": epoch + 1},
                     {**stats, "epoch_seconds": time.time() - t0})
        summary = records.metrics_file(history)
        best = summary["best"]["epoch"] if summary["best"] else None
        ckpt = run.checkpoint(epoch + 1, checkpoint_payload(
            "train", task, cfg, arch, epoch + 1, step, net, optim, rng_state()),
            outputs={"metrics.json": summary} if eval_sets else {}, keep=cfg.CKPT_KEEP,
            best=best)
        run.log(f"epoch {epoch + 1}: checkpoint {ckpt.name}"
                + (f"; best so far: epoch {best} ({summary['best']['split']} "
                   f"{summary['best']['metric']} {summary['best']['value']:.2f})" if best else ""))
    log_book.close()
    run.log(f"training finished: checkpoints in {run.folder}")
    return metrics
