"""Checkpoints: written atomically, read with ``weights_only=True``, released ones mapped.

Ours are self-describing: ``{'format', 'kind', 'task', 'config', 'arch', 'meta', 'epoch',
'step', 'state_dict', 'net_optim', 'arch_optim', 'rng'}``. The original's released files are
``{'state_dict': {...}, 'net_optim', 'epoch'}`` from DistributedDataParallel: every key starts
with ``module.``, the backbone is misspelt ``backnone.`` and task heads sit at the top level.
``map_original_keys`` turns those names into ours (documented in pretrained_models.md).

Ours also carry ``'sha256'``, a digest of everything else in them, checked on loading: a
truncated or damaged file is an error, never weights that crash (or mislead) later. Files
without it (the original's, ours from before) load unchecked.
"""
from __future__ import annotations

import hashlib
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
    """Write ``payload`` (+ format and digest) atomically; a failed write raises
    ``utils.io.WriteError`` naming ``path`` and leaves any earlier file there untouched."""
    full = {"format": FORMAT, **payload}
    full["sha256"] = payload_digest(full)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:      # a file object: a full disk raises OSError(ENOSPC)
            torch.save(full, f)

    atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes; an interrupted copy or write?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint, truncated or "
                              f"damaged? ({e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry")
    if "sha256" in ckpt:
        stored = ckpt.pop("sha256")
        if stored != payload_digest(ckpt):
            raise CheckpointError(f"{path}: damaged: its contents do not match the sha256 "
                                  f"digest stored in it")
    return ckpt


def payload_digest(payload: dict) -> str:
    """sha256 of a canonical serialisation of ``payload`` without its ``'sha256'`` entry:
    tensors by dtype, shape and bytes, containers and scalars by type and value."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)}:".encode() + obj)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__}{obj!r};".encode())
    else:   # nothing else loads with weights_only=True anyway
        raise TypeError(f"checkpoint entry of type {type(obj).__name__} cannot be digested")


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
