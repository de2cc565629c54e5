"""What runs inside a run, for search and training alike: batches and their order,
precision, the weight step, one epoch, the checkpoint payload, resume, evaluation.

``run_search`` (core/search.py) and ``run_train`` (core/train.py) keep only what is theirs.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.config import ConfigError
from core.data.bucketing import bucketed_sampler
from core.finite import NonFiniteError, grad_problem, loss_problem
from core.model import Net
from utils import dist
from utils.checkpoint import CheckpointError, load_checkpoint, set_rng_state
from utils.schedule import lr_at, set_lr


def build_net(cfg, task, backbone) -> Net:
    return Net(task.model_meta()["vocab_size"], task.word_vectors, cfg, backbone,
               task.build_head())


class RankBatches:
    """Global batches in a fixed order per seed; this rank takes every world-th sample.

    With one process it is a plain (shuffled) batch sampler. With N processes every rank
    builds the same permutation and takes its share of each global batch, so N processes
    see exactly the samples one process would, step by step.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)) \
            if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            share = order[start:start + self.batch_size][dist.rank()::dist.world()].tolist()
            if share:
                yield share


def loader(task, dataset: Dataset, cfg, batch_size: int, shuffle: bool, seed: int = 0):
    """Batches in a fixed order per (seed, epoch) so that a resumed run sees the same data.

    Always with its own generator: a loader without one draws its worker seed from the
    global RNG, and an evaluation would then change the dropout masks of later steps.
    Training batches are bucketed by region count with ``--BUCKET_BATCHES=on``.
    """
    batches = None
    if shuffle and cfg.BUCKET_BATCHES == "on":
        batches = bucketed_sampler(task, dataset, batch_size, seed, cfg.MAX_REGIONS)
    if batches is None:
        batches = RankBatches(len(dataset), batch_size, shuffle, seed)
    return DataLoader(dataset, batch_sampler=batches,
                      num_workers=cfg.NUM_WORKERS, collate_fn=task.collate,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg, device: torch.device):
    """The forward-pass precision context of ``--AMP`` (a no-op for 'off')."""
    if cfg.AMP == "off":
        return contextlib.nullcontext()
    if cfg.AMP not in AMP_DTYPES:
        raise ConfigError(f"AMP={cfg.AMP!r}; expected off, bf16 or fp16")
    return torch.autocast(device.type, dtype=AMP_DTYPES[cfg.AMP])


def grad_scaler(cfg, device: torch.device):
    """fp16 needs loss scaling (small gradients underflow); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if cfg.AMP == "fp16" else None


def weight_step(net: nn.Module, task, batch: dict, optim, params, cfg, device,
                scaler=None, where: str = "weight step") -> float:
    """One optimiser step on the network weights; parameters without gradient stay put.

    A non-finite loss, or gradient (without fp16 loss scaling, whose GradScaler skips such
    steps itself), stops the run before the step with an error naming ``where`` and the batch.
    """
    optim.zero_grad(set_to_none=True)
    with autocast(cfg, device):
        loss = task.loss(net(batch), batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optim)
    else:
        loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    total = loss.detach().float().reshape(1)     # summed with the gradients: all ranks agree
    dist.sum_grads(grads + [total])
    norm = None
    if cfg.GRAD_CLIP > 0:
        norm = nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.GRAD_CLIP)
    problem = loss_problem(total) or (grad_problem(net, params, norm) if scaler is None else None)
    if problem:
        raise NonFiniteError(stopped_message(where, problem, task, batch))
    if scaler is not None:
        scaler.step(optim)
        scaler.update()
    else:
        optim.step()
    return float(loss.detach())


def stopped_message(where: str, problem: str, task, batch: dict) -> str:
    """One line: where it happened, what is non-finite, which samples, what to do."""
    share = f" (this process's share of {dist.world()})" if dist.active() else ""
    return (f"{where}: {problem} on {task.describe_batch(batch)}{share}; stopped before the "
            f"optimiser step, nothing updated or saved (check these samples' feature files, "
            f"or lower LR_BASE)")


@torch.no_grad()
def evaluate(net: nn.Module, task, dataset: Dataset, cfg, device, desc: str = "eval"):
    """(metrics, predictions) of ``net`` on ``dataset``, in eval mode, as the task scores it."""
    was_training = net.training
    net.eval()
    try:
        with autocast(cfg, device):
            return task.evaluate(net, dataset, device, desc)
    finally:
        net.train(was_training)


def format_metrics(metrics: dict, skip=("perQuestionType",)) -> str:
    """One log line; long breakdowns (kept in metrics.json) are left out."""
    parts = []
    for k, v in metrics.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            parts.append(f"{k}: " + ", ".join(f"{a} {b:.2f}" if isinstance(b, float) else
                                             f"{a} {b}" for a, b in v.items()))
        else:
            parts.append(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


# --------------------------------------------------------------------------- one epoch


def run_epoch(net: nn.Module, task, dataset: Dataset, cfg, device, optim, params, scaler,
              epoch: int, step: int, desc: str, before_step: Callable[[], None] = lambda: None,
              after_step: Callable[[int], None] = lambda step: None) -> tuple[str, int, dict]:
    """One epoch of weight steps: the learning rate of ``epoch``, the task's epoch start
    (e.g. hard-negative mining), the batches of ``dataset`` in this epoch's fixed order.

    ``before_step()`` runs before each weight step (the search samples its path there),
    ``after_step(step)`` after it (the search's architecture steps). Returns the epoch's log
    line (``epoch 3: loss 1.2345, lr 1.50e-04, 58.6 samples/s``), the global step and the
    epoch's numbers for its record: ``{"loss", "lr", "samples_per_s"}``.
    """
    lr = lr_at(epoch, cfg.LR_BASE, cfg.LR_WARMUP_EPOCHS, cfg.LR_DECAY_EPOCHS, cfg.LR_DECAY_RATE)
    set_lr(optim, lr)
    with autocast(cfg, device):
        task.start_epoch(net, dataset, epoch, device)
    net.train()
    t0, total, n = time.time(), 0.0, 0
    bar = tqdm(loader(task, dataset, cfg, cfg.BATCH_SIZE, True, cfg.SEED * 1000 + epoch),
               desc=f"{desc} epoch {epoch + 1}/{cfg.MAX_EPOCH}", dynamic_ncols=True,
               disable=not dist.is_main())
    for batch in bar:
        batch = to_device(batch, device)
        before_step()
        total += weight_step(net, task, batch, optim, params, cfg, device, scaler,
                             where=f"epoch {epoch + 1}, step {step + 1}")
        n += task.pairs_in(batch)
        step += 1
        after_step(step)
        bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{lr:.2e}")
    stats = {"loss": total / max(n, 1), "lr": lr, "samples_per_s": n / (time.time() - t0)}
    return (f"epoch {epoch + 1}: loss {stats['loss']:.4f}, lr {lr:.2e}, "
            f"{stats['samples_per_s']:.1f} samples/s"), step, stats


# --------------------------------------------------------------------------- checkpoints


def checkpoint_payload(kind: str, task, cfg, arch, epoch: int, step: int, net: nn.Module,
                       optim, rng: dict, **extra) -> dict:
    """What a search or training checkpoint holds (``extra``: e.g. the architecture
    optimiser); self-describing, so that it resumes, trains or evaluates on its own."""
    return {"kind": kind, "task": task.name, "config": cfg.to_dict(), "arch": arch.to_json(),
            "meta": task.model_meta(), "epoch": epoch, "step": step,
            "state_dict": net.state_dict(), "net_optim": optim.state_dict(), **extra,
            "rng": rng}


def load_checked(path, task, log) -> dict:
    """A checkpoint whose vocabularies match the data's (a note is logged when only their
    sizes could be compared)."""
    ckpt = load_checkpoint(path)
    note = check_vocabularies(ckpt, task.model_meta(), str(path))
    if note:
        log(note)
    return ckpt


def resume_state(ckpt: dict, optim, run, generator: torch.Generator | None = None):
    """Continue where ``ckpt`` left off: the optimiser, the RNG state (with ``generator``,
    the search's path sampler), and (epoch, step, the outputs it records: ``arch.json``,
    ``metrics.json``)."""
    optim.load_state_dict(ckpt["net_optim"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"], generator)
    return ckpt["epoch"], ckpt.get("step", 0), run.restore_outputs(ckpt)


# (words key, size key, name) of the vocabularies a checkpoint's "meta" may record
VOCABULARIES = (("vocab", "vocab_size", "word vocabulary"),
                ("answers", "answer_size", "answer vocabulary"))


def check_vocabularies(ckpt: dict, data_meta: dict, source: str) -> str:
    """Refuse a checkpoint whose vocabularies differ from the data's: a same-size reordered
    vocabulary loads without a shape error but gives every word another vector. Checkpoints
    without words (the original's released files) get their sizes checked by the tensor
    shapes only; the returned note says so ("" when the words were compared)."""
    saved = ckpt.get("meta") or {}
    unchecked = []
    for words_key, size_key, name in VOCABULARIES:
        if words_key not in data_meta:
            continue
        ours, theirs = data_meta[words_key], saved.get(words_key)
        size = len(theirs) if theirs is not None else saved.get(size_key)
        if size is not None and size != len(ours):
            raise CheckpointError(f"{source}: its {name} has {size} entries, the data's has "
                                  f"{len(ours)} (other data files or tokenisation?)")
        if theirs is None:
            unchecked.append(name)
            continue
        for i, (a, b) in enumerate(zip(theirs, ours)):
            if a != b:
                raise CheckpointError(f"{source}: its {name} differs from the data's at index "
                                      f"{i}: checkpoint {a!r}, data {b!r} (other data files "
                                      f"or tokenisation?)")
    if not unchecked:
        return ""
    return (f"note: {source} records no {' or '.join(unchecked)} (a released or older "
            f"checkpoint): rebuilt from the data the original's way, only sizes are checked")
