"""Stop on NaN or inf before it reaches the weights, a checkpoint or ``arch.json``.

One non-finite value in one of ~120,000 feature files (or a diverging step) turns every
weight into NaN; the run would then go on for days logging ``loss nan`` and writing
checkpoints that look valid. These checks stop it at the first bad step, naming the step and
the batch, before the optimiser has changed anything.
"""
from __future__ import annotations

import torch
from torch import nn


class NonFiniteError(ValueError):
    """NaN or inf in a loss, a gradient or a tensor about to be saved."""


def loss_problem(loss: torch.Tensor) -> str | None:
    """What is wrong with ``loss`` (one value), or None when it is finite."""
    if bool(torch.isfinite(loss).all()):
        return None
    return f"the loss is {float(loss.reshape(-1)[0])}"


def grad_problem(net: nn.Module, params: list[nn.Parameter],
                 norm: torch.Tensor | None = None) -> str | None:
    """The first parameter of ``params`` whose gradient holds NaN or inf, or None.

    The total gradient norm (``norm``, as clipping computed it, else one fused reduction)
    decides with a single device sync; the parameter is looked up only when it is not finite.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    if norm is None:
        norm = nn.utils.get_total_norm(grads)
    if bool(torch.isfinite(norm)):
        return None
    names = {id(p): n for n, p in net.named_parameters()}
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad = int((~torch.isfinite(p.grad)).sum())
            return (f"the gradient of {names.get(id(p), 'a parameter')} holds {bad} "
                    f"non-finite value(s)")
    return None                 # finite values whose norm overflows: clipping copes


def nonfinite_entries(obj, prefix: str = ""):
    """(key path, count) of every floating tensor under ``obj`` with NaN or inf; ``obj`` is
    a state_dict or nested dicts / lists of tensors (a checkpoint payload)."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() or obj.is_complex():
            bad = int((~torch.isfinite(obj)).sum())
            if bad:
                yield prefix or "tensor", bad
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nonfinite_entries(v, f"{prefix}[{i}]")


def assert_finite(state, where: str) -> None:
    """Refuse to save ``state`` (see :func:`nonfinite_entries`) when it holds NaN or inf."""
    bad = list(nonfinite_entries(state))
    if bad:
        key, n = bad[0]
        raise NonFiniteError(f"{where}: refused to write it: {key} holds {n} non-finite "
                             f"value(s) ({len(bad)} tensor(s) in all); earlier checkpoints "
                             f"are left as they were")
