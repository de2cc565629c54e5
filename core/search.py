"""The search loop: weight steps on sampled paths, architecture steps on held-out batches.

Per epoch (ProxylessNAS order): sample a path and take a weight step on the weight split;
every ARCH_STEP_EVERY steps from ARCH_START_EPOCH on, take an architecture step on the next
batch of the architecture split. After the epoch: checkpoint, write the arg-max
architecture as ``"epochN"``, log every block's softmax weights and how many blocks changed
their arg-max (or for how many epochs none has), score the arg-max sub-network on the
architecture split, record it all in records.jsonl.
"""
from __future__ import annotations

import itertools
import time

import torch
from torch.utils.data import Subset

from core import pictures, records
from core.compile import compile_net
from core.loop import (autocast, build_net, checkpoint_payload, evaluate, format_metrics,
                       grad_scaler, load_checked, loader, resume_state, run_epoch,
                       stopped_message, to_device)
from core.mixed import Architect, mixed_ops, weight_parameters
from core.model import current_arch, search_backbone
from core.run import device_of, ensure_data
from utils import plots
from utils.checkpoint import load_weights, rng_state


def split_for_search(dataset, ratio: float):
    """First ``ratio`` of the train split for weights, the rest for alphas (fixed order)."""
    n = int(len(dataset) * ratio)
    if n == 0 or n == len(dataset):
        raise ValueError(f"ARCH_SPLIT_RATIO={ratio} leaves an empty part of {len(dataset)} "
                         f"samples")
    return Subset(dataset, range(n)), Subset(dataset, range(n, len(dataset)))


def run_search(cfg, task, run) -> dict:
    device = device_of(cfg, run.log)
    ensure_data(cfg, task, run.log)
    task.prepare()
    weight_set, arch_set = split_for_search(task.dataset(cfg.TRAIN_SPLIT), cfg.ARCH_SPLIT_RATIO)
    run.log(f"search: {len(weight_set)} samples for weights, {len(arch_set)} for the "
            f"architecture; mode {cfg.ARCH_MODE}")
    scored = arch_eval_set(arch_set, cfg.ARCH_EVAL_SAMPLES)
    baseline = task.baseline(weight_set, scored)
    if baseline:     # what the arg-max network's score after each epoch is to be read against
        run.log(f"baseline on the {len(scored)} scored samples of the architecture split: "
                f"{format_metrics(baseline)}")
    if cfg.ARCH_START_EPOCH >= cfg.MAX_EPOCH:    # a warm-up stage, to be extended by --RESUME?
        run.log(f"warning: ARCH_START_EPOCH = {cfg.ARCH_START_EPOCH} with MAX_EPOCH = "
                f"{cfg.MAX_EPOCH}: these epochs take no architecture step; arch.json will "
                f"hold the prior architecture")
    net = build_net(cfg, task, search_backbone(cfg)).to(device)
    compile_net(net, cfg, device, run.log)
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=cfg.LR_BASE, betas=tuple(cfg.OPT_BETAS), eps=cfg.OPT_EPS)
    architect = Architect(net, cfg.ARCH_LR, cfg.ARCH_BETAS, cfg.ARCH_MODE)
    path_gen = torch.Generator().manual_seed(cfg.SEED)
    scaler = grad_scaler(cfg, device)

    def arch_loss(batch):
        with autocast(cfg, device):
            return task.loss(net(batch), batch)

    start_epoch, step, archs, stable = 0, 0, {}, 0     # archs: the content of arch.json
    if cfg.RESUME:
        start_epoch, step, archs, stable = _resume(run, net, optim, architect, path_gen, task)
        run.save_config(cfg)            # the resumed run's config, now that it has loaded
    elif cfg.CKPT_PATH:
        warm_start(net, cfg.CKPT_PATH, task, run.log)
    arch_file = run.folder / "arch.json"
    metrics = {}
    run.work_starts()
    log_book = records.Records(run, cfg.TENSORBOARD, kept_until=start_epoch)
    chosen = records.argmax_of(records.block_probs(net))      # the arg-max before this epoch
    def sample_path():
        for m in architect.mixed:
            m.sample(path_gen)

    for epoch in range(start_epoch, cfg.MAX_EPOCH):
        t0 = time.time()
        for m in architect.mixed:
            m.choose_argmax()           # hard negatives are mined with the arg-max network
        arch_batches = _cycle(task, arch_set, cfg, cfg.SEED * 1000 + epoch + 500)

        def arch_step(step, epoch=epoch, arch_batches=arch_batches):
            if epoch >= cfg.ARCH_START_EPOCH and step % cfg.ARCH_STEP_EVERY == 0:
                arch_batch = to_device(next(arch_batches), device)
                where = f"epoch {epoch + 1}, step {step}, architecture step"
                architect.step(lambda: arch_loss(arch_batch), path_gen,
                               lambda problem: stopped_message(where, problem, task, arch_batch))

        line, step, stats = run_epoch(net, task, weight_set, cfg, device, optim, params,
                                      scaler, epoch, step, "search", before_step=sample_path,
                                      after_step=arch_step)
        arch = current_arch(net.backbone)
        archs[f"epoch{epoch + 1}"] = arch.to_json()
        run.log(line)
        run.log(block_weights(net))
        probs, searched = records.block_probs(net), epoch >= cfg.ARCH_START_EPOCH
        before, chosen = chosen, records.argmax_of(probs)
        changed, stable = records.argmax_step(before, chosen, stable, searched)
        run.log(records.stability_line(epoch + 1, changed, stable, len(architect.mixed),
                                       searched))
        metrics = _score_argmax(net, task, arch_set, cfg, device, path_gen)
        run.log(f"epoch {epoch + 1}: arg-max sub-network on the architecture split: "
                f"{format_metrics(metrics)}")
        # Drawn and recorded before the checkpoint: an epoch killed in between is redone.
        pictures.search_epoch(run, net, epoch + 1, stats["loss"], metrics, cfg.PICTURES)
        log_book.add({"epoch": epoch + 1, "arch_split": metrics, "argmax_changed": changed,
                      "argmax_stable_epochs": stable, "alphas": probs},
                     {**stats, "epoch_seconds": time.time() - t0})
        ckpt = run.checkpoint(epoch + 1, checkpoint_payload(
            "search", task, cfg, arch, epoch + 1, step, net, optim, rng_state(path_gen),
            arch_optim=architect.optim.state_dict(), argmax_stable=stable),
            outputs={arch_file.name: archs}, keep=cfg.CKPT_KEEP)
        run.log(f"epoch {epoch + 1}: checkpoint {ckpt.name}; architecture 'epoch{epoch + 1}' "
                f"-> {arch_file}")
    log_book.close()
    run.log(f"search finished: architectures in {arch_file} (use --ARCH_PATH={arch_file} "
            f"--ARCH_EPOCH=N); the arg-max has not changed for {stable} epoch(s) of "
            f"architecture steps")
    return metrics


def _cycle(task, dataset, cfg, seed: int):
    """Architecture batches, reshuffled on every pass, reproducible from ``seed``."""
    for k in itertools.count():
        yield from loader(task, dataset, cfg, cfg.BATCH_SIZE, True, seed * 7919 + k)


def arch_eval_set(arch_set, n: int):
    """The first ``n`` samples of the architecture split (all for 0): ranking all of a real
    ITM split costs images x captions pairs (Flickr30K's 20 %: 1.7e8) per epoch."""
    return Subset(arch_set, range(n)) if 0 < n < len(arch_set) else arch_set


def _score_argmax(net, task, arch_set, cfg, device, path_gen) -> dict:
    for m in mixed_ops(net):
        m.choose_argmax()
    # Evaluation must not consume the path RNG: a resumed search draws the same paths.
    state = path_gen.get_state()
    metrics, _ = evaluate(net, task, arch_eval_set(arch_set, cfg.ARCH_EVAL_SAMPLES), cfg,
                          device, desc="arg-max eval")
    path_gen.set_state(state)
    return metrics


def block_weights(net) -> str:
    """Softmax weights of every block, one line each, e.g. ``dec 03: SA .10 RSA .70 ...``."""
    lines = ["block weights (softmax of alpha):"]
    backbone = net.backbone
    for side in ("enc", "dec"):
        for i, m in enumerate(getattr(backbone, f"{side}_list")):
            probs = m.probs().tolist()
            cells = " ".join(f"{plots.short(n)} {p:.3f}" for n, p in zip(m.names, probs))
            best = m.names[int(m.alpha.argmax())]
            lines.append(f"  {side} {i:02d}: {cells}  -> {plots.short(best)}")
    return "\n".join(lines)


def warm_start(net, path, task, log) -> None:
    """--CKPT_PATH without --RESUME: a supernet's weights and alphas (ours, or the original's
    search checkpoint of hygr_*.py), then a new search from epoch 0 with fresh optimisers."""
    ckpt = load_checked(path, task, log)
    load_weights(net, ckpt["state_dict"], str(path), task.original_key_prefixes)
    log(f"warm start: supernet weights and architecture logits loaded from {path}")


def _resume(run, net, optim, architect, path_gen, task) -> tuple[int, int, dict, int]:
    """(epoch, step, arch.json content, arg-max stability count) of the newest intact
    checkpoint; a folder without one (killed before its first checkpoint) starts from
    scratch."""
    path = run.last_checkpoint()
    if path is None:
        return 0, 0, {}, 0
    ckpt = load_checked(path, task, run.log)
    load_weights(net, ckpt["state_dict"], str(path))
    architect.optim.load_state_dict(ckpt["arch_optim"])
    epoch, step, outputs = resume_state(ckpt, optim, run, path_gen)
    run.log(f"resumed from {path}: epoch {epoch}, step {step}")
    return epoch, step, outputs.get("arch.json", {}), ckpt.get("argmax_stable", 0)
