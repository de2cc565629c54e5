"""Checkpoints: written atomically, read with ``weights_only=True``, released ones mapped.

Ours are self-describing: ``{'format', 'kind', 'task', 'config', 'arch', 'meta', 'epoch',
'step', 'state_dict', 'net_optim', 'arch_optim', 'rng'}``. The original's released files are
``{'state_dict': {...}, 'net_optim', 'epoch'}`` from DistributedDataParallel: every key starts
with ``module.``, the backbone is misspelt ``backnone.`` and task heads sit at the top level.
``map_original_keys`` turns those names into ours (documented in pretrained_models.md).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.io import atomic_write

FORMAT = "mmnas-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry")
    return ckpt


def map_original_keys(state: dict, head_prefixes=()) -> dict:
    """Released names -> ours: strip ``module.``, ``backnone.`` -> ``backbone.``, heads."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("backnone."):
            key = "backbone." + key[len("backnone."):]
        for old, new in head_prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_weights(net: nn.Module, state: dict, source: str, head_prefixes=()) -> None:
    """Load ``state`` (ours or released) into ``net``; mismatches name keys and shapes."""
    state = map_original_keys(state, head_prefixes)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if wrong:
        k, got, want = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape, e.g. {k}: checkpoint "
                        f"{list(got)}, network {list(want)} (another vocabulary, answer set, "
                        f"HSIZE or architecture?)")
    if missing:
        problems.append(f"{len(missing)} network tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) fit nothing, e.g. "
                        f"{unexpected[:3]}")
    if problems:
        raise CheckpointError(f"{source}: does not fit this network: " + "; ".join(problems))
    net.load_state_dict(state)


# ---- RNG state, in a form weights_only loading accepts ------------------------------------

def rng_state(path_gen: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if path_gen is not None:
        state["path"] = path_gen.get_state()
    return state


def set_rng_state(state: dict, path_gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if path_gen is not None and "path" in state:
        path_gen.set_state(state["path"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
