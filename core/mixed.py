"""The mixed op (all candidates of a block + binary gates) and the architecture step.

ProxylessNAS-style, as MMNas searches: a weight step runs one sampled path; an architecture
step samples binary gates g (one-hot), forms ``out = sum_i g_i * op_i(x)``, reads
``dL/dg_j = <op_j(x), dL/dout>`` and turns it into logit gradients
``dL/dalpha_i = sum_j dL/dg_j * p_j * (delta_ij - p_i)``. Unlike the original, inactive
candidates are evaluated without autograd (only their values enter dL/dg), and a weight
step leaves switched-off candidates without gradient, so Adam does not move them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from core.finite import NonFiniteError, loss_problem
from core.ops import OpSpec, build_op
from utils import dist


class MixedOp(nn.Module):
    """One searchable block: ``candidate_ops`` plus architecture logits ``alpha``.

    State set by the search loop (never a class-level global): ``active`` is the index of
    the path that runs with autograd; ``gates`` (architecture step only) is the binary gate
    vector, and ``involved`` the candidates whose outputs enter the gated sum.
    """

    def __init__(self, names: list[str], spec: OpSpec, prior: str | None = None,
                 prior_logit: float = 1.0):
        super().__init__()
        self.names = tuple(names)
        self.candidate_ops = nn.ModuleList(build_op(n, spec) for n in names)
        init = torch.tensor([prior_logit if n == prior else -prior_logit for n in names]) \
            if prior else torch.zeros(len(names))
        self.alpha = nn.Parameter(init)
        self.active = int(self.alpha.argmax())
        self.gates: torch.Tensor | None = None
        self.involved: list[int] = []
        self._old_alpha: torch.Tensor | None = None

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha.detach(), -1)

    def choose_argmax(self) -> None:
        self.active, self.gates = int(self.alpha.argmax()), None

    def sample(self, gen: torch.Generator) -> None:
        """Weight step: one path drawn from softmax(alpha)."""
        self.active = int(torch.multinomial(self.probs(), 1, generator=gen))
        self.gates = None

    def binarize(self, mode: str, gen: torch.Generator) -> None:
        """Architecture step: draw the binary gates (``full``: over all, ``two``: over two)."""
        p = self.probs()
        if mode == "full":
            self.involved = list(range(len(self.names)))
            self.active = int(torch.multinomial(p, 1, generator=gen))
        elif mode == "two":
            pair = torch.multinomial(p, 2, replacement=False, generator=gen).tolist()
            p_pair = torch.softmax(self.alpha.detach()[pair], -1)
            self.involved = pair
            self.active = pair[int(torch.multinomial(p_pair, 1, generator=gen))]
            self._old_alpha = self.alpha.detach()[pair].clone()
        else:
            raise ValueError(f"ARCH_MODE must be 'full' or 'two', got {mode!r}")
        gates = torch.zeros_like(self.alpha.detach())
        gates[self.active] = 1.0
        self.gates = gates.requires_grad_(True)

    def forward(self, x, x_mask, y, y_mask, rel):
        if self.gates is None:
            return self.candidate_ops[self.active](x, x_mask, y, y_mask, rel)
        out = 0
        for i in self.involved:
            if i == self.active:
                value = self.candidate_ops[i](x, x_mask, y, y_mask, rel)
            else:
                with torch.no_grad():   # only its value is needed, for dL/dg_i
                    value = self.candidate_ops[i](x, x_mask, y, y_mask, rel)
            out = out + self.gates[i] * value
        return out

    def set_alpha_grad(self, gate_grad: torch.Tensor | None) -> None:
        """dL/dalpha from dL/dgates over the involved candidates."""
        grad = torch.zeros_like(self.alpha)
        if gate_grad is not None:
            idx = self.involved
            p = torch.softmax(self.alpha.detach()[idx], -1)
            g = gate_grad[idx]
            # sum_j g_j p_j (delta_ij - p_i) = p_i g_i - p_i <g, p>
            grad[idx] = p * g - p * (g * p).sum()
        self.alpha.grad = grad

    def rescale_two(self) -> None:
        """``two`` mode: shift the two updated logits so the others' probabilities stay."""
        if self._old_alpha is None:
            return
        idx = self.involved
        with torch.no_grad():
            new = self.alpha[idx]
            offset = math.log(new.exp().sum() / self._old_alpha.exp().sum())
            self.alpha[idx] -= offset
        self._old_alpha = None

    def end_arch_step(self) -> None:
        self.gates, self.involved = None, []


def gate_problem(grads: list[torch.Tensor]) -> str | None:
    """The first block whose gate gradient holds NaN or inf (no loss scaling here: an inf
    gate gradient is never legitimate), or None."""
    if not grads or bool(torch.isfinite(torch.cat(grads)).all()):     # one device sync
        return None
    i = next(i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all()))
    return f"the gate gradient of searchable block {i} is {grads[i].tolist()}"


def mixed_ops(net: nn.Module) -> list[MixedOp]:
    return [m for m in net.modules() if isinstance(m, MixedOp)]


def arch_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [m.alpha for m in mixed_ops(net)]


def weight_parameters(net: nn.Module) -> list[nn.Parameter]:
    alphas = {id(a) for a in arch_parameters(net)}
    return [p for p in net.parameters() if id(p) not in alphas]


class Architect:
    """The architecture step: owns the alpha optimiser and the binary-gate gradient."""

    def __init__(self, net: nn.Module, lr: float, betas, mode: str):
        self.net, self.mode = net, mode
        self.mixed = mixed_ops(net)
        self.optim = torch.optim.Adam(arch_parameters(net), lr=lr, betas=tuple(betas),
                                      eps=1e-8, weight_decay=0.0)

    def step(self, loss_fn, gen: torch.Generator, explain=None) -> float:
        """One gradient step on alpha; ``loss_fn()`` runs the net on an architecture batch.

        A non-finite loss or gate gradient raises NonFiniteError before alpha moves (a NaN
        alpha would be written to arch.json); ``explain(problem)`` words its message.
        """
        for m in self.mixed:
            m.binarize(self.mode, gen)
        try:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [m.gates for m in self.mixed], allow_unused=True)
            grads = [torch.zeros_like(m.gates) if g is None else g
                     for m, g in zip(self.mixed, grads)]
            total = loss.detach().float().reshape(1)
            dist.sum_grads(grads + [total])        # every rank drew the same gates
            problem = loss_problem(total) or gate_problem(grads)
            if problem:
                raise NonFiniteError(explain(problem) if explain else
                                     f"architecture step: {problem}")
            self.optim.zero_grad(set_to_none=True)
            for m, g in zip(self.mixed, grads):
                m.set_alpha_grad(g)
            self.optim.step()
            if self.mode == "two":
                for m in self.mixed:
                    m.rescale_two()
        finally:
            for m in self.mixed:
                m.end_arch_step()
        return float(loss.detach())
