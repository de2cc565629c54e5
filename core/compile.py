"""``--COMPILE=on``: torch.compile (inductor) of the network, for training, search and evaluation.

A fixed network (training, evaluation) is compiled whole: its forward is one graph (two with
eval mode, one more without autograd), recompiled only when a shape changes (the region count
of a batch; dynamic shapes after the first change). A search supernet runs another sampled
path every step, which a whole-network graph would turn into a recompile per path; instead
every candidate operator is compiled on its own: the graphs are per operator type (modules of
one class share theirs), so their number stays bounded by the candidate types, whatever the
path (see ``compile_net`` for the bound). Compiled modules keep their parameter names: checkpoints are the same as eager ones.

Inductor needs a C++ compiler on CPUs and Triton on GPUs; without one the network stays eager
and the log says why. Compiled dropout draws its masks from inductor's own generator (seeded
from torch's): runs are reproducible, but not mask for mask equal to eager ones.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from core.mixed import mixed_ops

CPP_COMPILERS = ("g++", "clang++", "c++")


def missing_compiler(device: torch.device) -> str:
    """Why inductor cannot compile for ``device`` here ("" when it can)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return "" if has_triton() else "Triton is not installed (pip install triton)"
    names = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPP_COMPILERS)
    if not any(shutil.which(n) for n in names):
        return (f"no C++ compiler found ({' or '.join(names)} on PATH; inductor needs one on "
                f"CPUs: install g++ or set CXX)")
    return ""


def compile_net(net: nn.Module, cfg, device: torch.device, log,
                backend: str = "inductor") -> nn.Module:
    """``net`` compiled in place as ``cfg.COMPILE`` says (see the module doc); returns it.
    ``backend``: another torch.compile backend (the tests use 'aot_eager', which traces the
    same graphs, forward and backward, without inductor's slow C++ builds)."""
    if cfg.COMPILE != "on":
        return net
    why = missing_compiler(device) if backend == "inductor" else ""
    if why:
        log(f"COMPILE=on: {why}; running eager")
        return net
    searchable = mixed_ops(net)
    if searchable:
        kinds = {type(op) for block in searchable for op in block.candidate_ops}
        # Operators share their base class's forward, whose graphs dynamo counts together:
        # one per kind x autograd on/off x train/eval x encoder/decoder inputs (shapes are
        # dynamic from the start, so region counts and batch sizes add none).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   8 * len(kinds))
        for block in searchable:
            for op in block.candidate_ops:
                op.compile(backend=backend, dynamic=True)
        log(f"COMPILE=on: every candidate operator of the {len(searchable)} searchable blocks "
            f"compiled on its own ({backend})")
    else:
        net.compile(backend=backend)
        log(f"COMPILE=on: the network's forward compiled ({backend})")
    return net


def compile_counters() -> dict:
    """Graphs compiled (a recompile adds one), frames captured and graph breaks so far in
    this process (torch._dynamo)."""
    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "frames": int(counters["stats"]["calls_captured"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
