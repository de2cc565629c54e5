"""Architecture JSON: ``{"epochN": {"enc": [["op"], ...], "dec": [["op"], ...]}}``.

One op per block (``LAYERS = 1``), written as a one-element list like the original files.
A search appends its arg-max architecture under ``"epochN"`` after every epoch, so the file
it writes can be passed straight to training with ``--ARCH_PATH`` and ``--ARCH_EPOCH=N``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.ops import OPS
from utils.io import atomic_write_text, decode_utf8


class ArchError(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    enc: tuple[str, ...]
    dec: tuple[str, ...]

    def to_json(self) -> dict:
        return {"enc": [[op] for op in self.enc], "dec": [[op] for op in self.dec]}

    def uses(self, side: str, predicate) -> bool:
        return any(predicate(op) for op in getattr(self, side))


def parse_arch(entry, source: str, n_enc: int, n_dec: int) -> Arch:
    """Validate one ``{"enc": ..., "dec": ...}`` entry; ``source`` names it in errors."""
    if not isinstance(entry, dict):
        raise ArchError(f"{source}: expected an object with 'enc' and 'dec' lists")
    sides = {}
    for side, count in (("enc", n_enc), ("dec", n_dec)):
        blocks = entry.get(side)
        if not isinstance(blocks, list):
            raise ArchError(f"{source}: field '{side}' is missing or not a list")
        if len(blocks) != count:
            raise ArchError(f"{source}: field '{side}' has {len(blocks)} blocks, expected "
                            f"{count} ({side.upper()}_BLOCKS)")
        ops = []
        for i, block in enumerate(blocks):
            op = block[0] if isinstance(block, list) and len(block) == 1 else block
            if not isinstance(op, str):
                raise ArchError(f"{source}: {side}[{i}] = {block!r}, expected [\"op name\"]")
            if op not in OPS:
                raise ArchError(f"{source}: {side}[{i}] has unknown op {op!r}; valid names: "
                                f"{', '.join(sorted(OPS))}")
            ops.append(op)
        sides[side] = tuple(ops)
    return Arch(**sides)


def read_arch_file(path: Path):
    """The parsed JSON of an architecture file; a missing or unreadable one is an ArchError."""
    if not path.is_file():
        raise ArchError(f"architecture file {path} does not exist")
    try:
        return json.loads(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise ArchError(f"{path}: not valid JSON ({e})") from None


def load_arch(path: str | Path, epoch: int, n_enc: int, n_dec: int) -> Arch:
    path = Path(path)
    data = read_arch_file(path)
    key = f"epoch{epoch}"
    if not isinstance(data, dict) or key not in data:
        have = ", ".join(sorted(data, key=_epoch_order)) if isinstance(data, dict) else "none"
        raise ArchError(f"{path}: no key {key!r} (from --ARCH_EPOCH={epoch}); keys present: "
                        f"{have or 'none'}")
    return parse_arch(data[key], f"{path} [{key}]", n_enc, n_dec)


def save_arch(path: str | Path, epoch: int, arch: Arch) -> None:
    """Add (or replace) ``"epochN"`` in the JSON file, keeping the other epochs."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[f"epoch{epoch}"] = arch.to_json()
    data = dict(sorted(data.items(), key=lambda kv: _epoch_order(kv[0])))
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _epoch_order(key: str):
    digits = key[5:] if key.startswith("epoch") else ""
    return (0, int(digits)) if digits.isdigit() else (1, key)
