"""Learning rate per epoch: the original's warm-up then step decay, as a pure function."""
from __future__ import annotations


def lr_at(epoch: int, base: float, warmup: int, decay_epochs: list[int], rate: float) -> float:
    """Learning rate of 0-based ``epoch``.

    Warm-up: base x 1/(W+1), 2/(W+1), ... for the first W epochs (W = 3: 1/4, 2/4, 3/4).
    Decay: x ``rate`` for every listed 0-based epoch already reached (the original's
    ``if epoch in LR_DECAY_LIST`` at the start of each epoch).
    """
    warm = (epoch + 1) / (warmup + 1) if epoch < warmup else 1.0
    return base * warm * rate ** sum(epoch >= d for d in decay_epochs)


def set_lr(optim, lr: float) -> None:
    for group in optim.param_groups:
        group["lr"] = lr
