"""The search loop: weight steps on sampled paths, architecture steps on held-out batches.

Per epoch (ProxylessNAS order): sample a path and take a weight step on the weight split;
every ARCH_STEP_EVERY steps from ARCH_START_EPOCH on, take an architecture step on the next
batch of the architecture split. After the epoch: checkpoint, write the arg-max
architecture as ``"epochN"``, log every block's softmax weights, score the arg-max
sub-network on the architecture split.
"""
from __future__ import annotations

import itertools
import time

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from core import pictures
from core.engine import (autocast, build_net, device_of, ensure_data, evaluate, format_metrics,
                         grad_scaler, loader, stopped_message, to_device, weight_step)
from core.mixed import Architect, mixed_ops, weight_parameters
from core.model import current_arch, search_backbone
from core.ops import ABBREV
from core.tasks.base import check_vocabularies
from utils import dist
from utils.checkpoint import load_checkpoint, load_weights, rng_state, set_rng_state
from utils.schedule import lr_at, set_lr


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
    if cfg.ARCH_START_EPOCH >= cfg.MAX_EPOCH:    # a warm-up stage, to be extended by --RESUME?
        run.log(f"warning: ARCH_START_EPOCH = {cfg.ARCH_START_EPOCH} with MAX_EPOCH = "
                f"{cfg.MAX_EPOCH}: these epochs take no architecture step; arch.json will "
                f"hold the prior architecture")
    net = build_net(cfg, task, search_backbone(cfg)).to(device)
    params = weight_parameters(net)
    optim = torch.optim.Adam(params, lr=cfg.LR_BASE, betas=tuple(cfg.OPT_BETAS), eps=cfg.OPT_EPS)
    architect = Architect(net, cfg.ARCH_LR, cfg.ARCH_BETAS, cfg.ARCH_MODE)
    path_gen = torch.Generator().manual_seed(cfg.SEED)
    scaler = grad_scaler(cfg, device)

    def arch_loss(batch):
        with autocast(cfg, device):
            return task.loss(net(batch), batch)

    start_epoch, step, archs = 0, 0, {}     # archs: the content of arch.json
    if cfg.RESUME:
        start_epoch, step, archs = _resume(run, net, optim, architect, path_gen, task)
        run.save_config(cfg)            # the resumed run's config, now that it has loaded
    elif cfg.CKPT_PATH:
        warm_start(net, cfg.CKPT_PATH, task, run.log)
    arch_file = run.folder / "arch.json"
    metrics = {}
    for epoch in range(start_epoch, cfg.MAX_EPOCH):
        lr = lr_at(epoch, cfg.LR_BASE, cfg.LR_WARMUP_EPOCHS, cfg.LR_DECAY_EPOCHS,
                   cfg.LR_DECAY_RATE)
        set_lr(optim, lr)
        for m in architect.mixed:
            m.choose_argmax()           # hard negatives are mined with the arg-max network
        with autocast(cfg, device):
            task.start_epoch(net, weight_set, epoch, device)
        net.train()
        arch_batches = _cycle(task, arch_set, cfg, cfg.SEED * 1000 + epoch + 500)
        t0, total, n = time.time(), 0.0, 0
        bar = tqdm(loader(task, weight_set, cfg, cfg.BATCH_SIZE, True, cfg.SEED * 1000 + epoch),
                   desc=f"search epoch {epoch + 1}/{cfg.MAX_EPOCH}", dynamic_ncols=True,
                   disable=not dist.is_main())
        for batch in bar:
            batch = to_device(batch, device)
            for m in architect.mixed:
                m.sample(path_gen)
            total += weight_step(net, task, batch, optim, params, cfg, device, scaler,
                                 where=f"epoch {epoch + 1}, step {step + 1}")
            n += len(batch["txt"])
            step += 1
            if epoch >= cfg.ARCH_START_EPOCH and step % cfg.ARCH_STEP_EVERY == 0:
                arch_batch = to_device(next(arch_batches), device)
                where = f"epoch {epoch + 1}, step {step}, architecture step"
                architect.step(lambda: arch_loss(arch_batch), path_gen,
                               lambda problem: stopped_message(where, problem, task, arch_batch))
            bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{lr:.2e}")
        arch = current_arch(net.backbone)
        archs[f"epoch{epoch + 1}"] = arch.to_json()
        ckpt = run.checkpoint(epoch + 1, {
            "kind": "search", "task": task.name, "config": cfg.to_dict(),
            "arch": arch.to_json(), "meta": task.model_meta(), "epoch": epoch + 1,
            "step": step, "state_dict": net.state_dict(), "net_optim": optim.state_dict(),
            "arch_optim": architect.optim.state_dict(), "rng": rng_state(path_gen)},
            outputs={arch_file.name: archs})
        run.log(f"epoch {epoch + 1}: loss {total / max(n, 1):.4f}, lr {lr:.2e}, "
                f"{n / (time.time() - t0):.1f} samples/s; checkpoint {ckpt.name}; "
                f"architecture 'epoch{epoch + 1}' -> {arch_file}")
        run.log(block_weights(net))
        metrics = _score_argmax(net, task, arch_set, cfg, device, path_gen)
        run.log(f"epoch {epoch + 1}: arg-max sub-network on the architecture split: "
                f"{format_metrics(metrics)}")
        pictures.search_epoch(run, net, epoch + 1, total / max(n, 1), metrics)
    run.log(f"search finished: architectures in {arch_file} (use --ARCH_PATH={arch_file} "
            f"--ARCH_EPOCH=N)")
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
            cells = " ".join(f"{ABBREV.get(n, n)} {p:.3f}" for n, p in zip(m.names, probs))
            best = m.names[int(m.alpha.argmax())]
            lines.append(f"  {side} {i:02d}: {cells}  -> {ABBREV.get(best, best)}")
    return "\n".join(lines)


def warm_start(net, path, task, log) -> None:
    """--CKPT_PATH without --RESUME: a supernet's weights and alphas (ours, or the original's
    search checkpoint of hygr_*.py), then a new search from epoch 0 with fresh optimisers."""
    ckpt = load_checkpoint(path)
    note = check_vocabularies(ckpt, task.model_meta(), str(path))
    if note:
        log(note)
    load_weights(net, ckpt["state_dict"], str(path), task.original_key_prefixes)
    log(f"warm start: supernet weights and architecture logits loaded from {path}")


def _resume(run, net, optim, architect, path_gen, task) -> tuple[int, int, dict]:
    """(epoch, step, arch.json content) of the newest intact checkpoint; a folder without
    one (killed before its first checkpoint) starts from scratch."""
    path = run.last_checkpoint()
    if path is None:
        return 0, 0, {}
    ckpt = load_checkpoint(path)
    note = check_vocabularies(ckpt, task.model_meta(), str(path))
    if note:
        run.log(note)
    load_weights(net, ckpt["state_dict"], str(path))
    optim.load_state_dict(ckpt["net_optim"])
    architect.optim.load_state_dict(ckpt["arch_optim"])
    set_rng_state(ckpt["rng"], path_gen)
    archs = run.restore_outputs(ckpt).get("arch.json", {})
    run.log(f"resumed from {path}: epoch {ckpt['epoch']}, step {ckpt['step']}")
    return ckpt["epoch"], ckpt["step"], archs
