"""Checkpoints: written atomically, read with ``weights_only=True``, released ones mapped.

Ours are self-describing: ``{'format', 'kind', 'task', 'config', 'arch', 'meta', 'epoch',
'step', 'state_dict', 'net_optim', 'arch_optim', 'rng'}``. The original's released files are
``{'state_dict': {...}, 'net_optim', 'epoch'}`` from DistributedDataParallel: every key starts
with ``module.``, block ``i`` of the encoder is ``backnone.cells_enc.0.dag.<i>.0.`` (sic), the
relation linear and the task heads sit at the top level under their own names.
``map_original_keys`` turns those names into ours (the table is in pretrained_models.md).

Ours also carry ``'sha256'``, a digest of everything else in them, checked on loading: a
truncated or damaged file is an error, never weights that crash (or mislead) later. Files
without it (the original's, ours from before) load unchecked.
"""
from __future__ import annotations

import hashlib
import random
import re
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


def checkpoints_in(folder: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of a run folder's ``epochN.pkl`` files, oldest first."""
    found = ((re.fullmatch(r"epoch(\d+)\.pkl", p.name), p) for p in Path(folder).glob("*.pkl"))
    return sorted((int(m[1]), p) for m, p in found if m)


def prune_checkpoints(folder: Path, epoch: int, keep: int, best: int | None = None) -> tuple[
        list[str], list[str]]:
    """After ``epochN.pkl`` of ``epoch`` is written: delete the checkpoints of earlier epochs
    but the newest ``keep`` (0: keep all), ``best`` (the best epoch of a training) and the
    two a ``--RESUME`` needs: the newest intact one and its fallback, the next intact one
    (each checked against its digest, so a damaged one never counts). Checkpoints of later
    epochs (a resume from an earlier one overwrites them) are left alone. Returns (deleted
    names, damaged names seen)."""
    mine = [(e, p) for e, p in checkpoints_in(folder) if e <= epoch]
    if keep <= 0 or len(mine) <= keep:
        return [], []
    kept = {e for e, _ in mine[-keep:]} | ({best} if best else set())
    intact, damaged = [], []
    for e, path in reversed(mine):
        if len(intact) == 2:
            break
        try:
            load_checkpoint(path)
            intact.append(e)
        except CheckpointError:
            damaged.append(path.name)
    kept |= set(intact)
    deleted = []
    for e, path in mine:
        if e not in kept:
            path.unlink(missing_ok=True)
            deleted.append(path.name)
    return deleted, damaged


# Top-level modules of the original's networks (full_*.py, hygr_*.py) whose names differ
# from ours in every task; the heads differ per task (``Task.original_key_prefixes``).
ORIGINAL_PREFIXES = (
    ("imgfeat_linear.", "img_feat_linear."),
    ("linear_y_rel.", "backbone.linear_rel_img."),    # image relations, Linear(4 -> REL_SIZE)
    ("linear_x_rel.", "backbone.linear_rel_txt."),    # text relations, Linear(3 -> REL_SIZE)
)
# Block i of the original's encoder / decoder: cell 0 (LAYERS = 1), node i, op 0.
ORIGINAL_BLOCK = re.compile(r"backnone\.cells_(enc|dec)\.0\.dag\.(\d+)\.0\.(.+)")
# The original's search spaces, in the order of its supernets' ``candidate_ops`` and
# ``alpha_prob`` (ops_adapter.py: Used_OPS['enc_safe'] and Used_OPS['dec_safe']).
ORIGINAL_CANDIDATES = {"enc": ("self_att_64", "feed_forward"),
                       "dec": ("self_att_64", "rel_self_att_64", "guided_att_64",
                               "feed_forward")}
# The original builds both relation linears whatever the architecture, we only when a block
# reads them: a checkpoint's copy is dropped when the network has none (nothing read it).
OPTIONAL_PREFIXES = ("backbone.linear_rel_img.", "backbone.linear_rel_txt.")
OUR_BLOCK = re.compile(r"backbone\.(enc|dec)_list\.(\d+)\.(.+)")


def map_original_keys(state: dict, head_prefixes=(), candidates: dict | None = None) -> dict:
    """Released names -> ours; our own names pass unchanged.

    ``head_prefixes``: the task's (original, ours) pairs for the head. ``candidates``:
    ``{'enc': names, 'dec': names}`` of the supernet loading an original search checkpoint,
    whose candidates and alphas are reordered by name (None: candidates keep their index).
    """
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        block = ORIGINAL_BLOCK.fullmatch(key)
        if block:
            key, value = _block_key(*block.groups(), value, candidates)
            if key is None:
                continue
        else:
            key = _renamed(key, ORIGINAL_PREFIXES + tuple(head_prefixes))
        out[key] = value
    return out


def _renamed(key: str, prefixes) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _block_key(side: str, index: str, rest: str, value, candidates):
    """One tensor of the original's block ``index`` -> (our key, value); (None, None): drop."""
    ours = f"backbone.{side}_list.{index}."
    if rest == "alpha_gate":          # the binary gates: scratch of an architecture step
        return None, None
    if rest == "alpha_prob":
        return ours + "alpha", _reorder(value, side, candidates)
    candidate = re.fullmatch(r"candidate_ops\.(\d+)\.(.+)", rest)
    if candidate:
        ours += f"candidate_ops.{_our_index(side, int(candidate[1]), candidates)}."
        rest = candidate[2]
    return ours + _renamed(rest, (("ln.", "norm."),)), value


def _our_order(side: str, candidates) -> list[int] | None:
    """Our candidate j is the original's candidate ``order[j]`` (None: same indices)."""
    if not candidates or side not in candidates:
        return None
    theirs, ours = ORIGINAL_CANDIDATES[side], tuple(candidates[side])
    if sorted(theirs) != sorted(ours):
        raise CheckpointError(f"an original search checkpoint has the {side} candidates "
                              f"{list(theirs)}, this supernet {list(ours)}; set "
                              f"{side.upper()}_CANDIDATES to the original's to load it")
    return [theirs.index(name) for name in ours]


def _our_index(side: str, k: int, candidates) -> int:
    order = _our_order(side, candidates)
    return k if order is None or k >= len(order) else order.index(k)


def _reorder(alpha, side: str, candidates):
    order = _our_order(side, candidates)
    return alpha if order is None or len(alpha) != len(order) else alpha[order]


def _candidates_of(net: nn.Module) -> dict:
    """The candidate names of a supernet's blocks, per side (empty for a fixed network)."""
    backbone = getattr(net, "backbone", None)
    out = {}
    for side in ("enc", "dec"):      # mixed blocks (core.mixed.MixedOp) hold candidate_ops
        mixed = [b for b in getattr(backbone, f"{side}_list", []) if hasattr(b, "candidate_ops")]
        if mixed:
            out[side] = mixed[0].names
    return out


def load_weights(net: nn.Module, state: dict, source: str, head_prefixes=()) -> None:
    """Load ``state`` (ours or released) into ``net``; mismatches name keys and shapes."""
    try:
        state = map_original_keys(state, head_prefixes, _candidates_of(net))
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(OPTIONAL_PREFIXES)}
    problems = []
    other_arch, explained = _architecture_difference(state, own)
    if other_arch:
        problems.append(other_arch)
    missing = [k for k in own if k not in state and k not in explained]
    unexpected = [k for k in state if k not in own and k not in explained]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
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


def _architecture_difference(state: dict, own: dict) -> tuple[str, set]:
    """Blocks whose tensor names differ between checkpoint and network, as one sentence
    (e.g. "dec block 2 is 'feed_forward' in the checkpoint but 'rel_self_att' in the
    network"), and the keys of those blocks, which it explains."""
    theirs, ours = _blocks(state), _blocks(own)
    differ = sorted((b for b in theirs.keys() | ours.keys() if theirs.get(b) != ours.get(b)),
                    key=lambda b: (b[0] != "enc", b[1]))
    if not differ:
        return "", set()
    cases = [f"{side} block {i} is {_kind(theirs.get((side, i)))} in the checkpoint but "
             f"{_kind(ours.get((side, i)))} in the network" for side, i in differ[:3]]
    more = f"; {len(differ) - 3} more block(s) differ" if len(differ) > 3 else ""
    explained = {f"backbone.{side}_list.{i}.{rest}" for side, i in differ
                 for rest in theirs.get((side, i), set()) | ours.get((side, i), set())}
    searches = {any(r.startswith("candidate_ops.") for rests in blocks.values() for r in rests)
                for blocks in (theirs, ours)}
    if len(searches) == 2:
        hint = ("a search checkpoint loads into a search (--CKPT_PATH of search_<task>.py), a "
                "trained one into training")
    elif searches == {True}:
        hint = "search with the candidates and block counts it was searched with"
    else:
        hint = "pass the --ARCH_PATH and --ARCH_EPOCH it was trained with"
    return f"it holds another architecture ({'; '.join(cases)}{more}; {hint})", explained


def _blocks(keys) -> dict[tuple[str, int], set[str]]:
    out: dict[tuple[str, int], set[str]] = {}
    for key in keys:
        m = OUR_BLOCK.fullmatch(key)
        if m:
            out.setdefault((m[1], int(m[2])), set()).add(m[3])
    return out


def _kind(rests: set[str] | None) -> str:
    """What a block's tensor names say it is. SA and GA hold the same tensors."""
    rests = rests or set()
    if not rests:
        return "absent (or 'skip_connect')"
    candidates = {r.split(".")[1] for r in rests if r.startswith("candidate_ops.")}
    if candidates:
        return f"a search block of {len(candidates)} candidates"
    if "mhatt.linear_r.weight" in rests:
        return "'rel_self_att'"
    if "mhatt.linear_q.weight" in rests:
        return "'self_att' or 'guided_att'"
    if {"mlp.fc.linear.weight", "mlp.linear.weight"} <= rests:
        return "'feed_forward'"
    if rests == {"norm.a_2", "norm.b_2"}:
        return "'none'"
    return "a block of " + ", ".join(sorted({r.split(".")[0] for r in rests}))


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
