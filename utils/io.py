"""Atomic file writes: a crash never leaves a half-written checkpoint, JSON or log config."""
from __future__ import annotations

import codecs
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

# ``.<name>.<8 hex digits>.tmp``: the temporary file of an unfinished atomic write.
TMP_NAME = re.compile(r"\..+\.[0-9a-z_]{8}\.tmp")


class WriteError(Exception):
    """A file could not be written (disk full, no permission): names the file and why."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` becomes a ``WriteError`` naming ``path``. Only a killed process leaves its
    temporary file behind (``remove_orphan_tmp`` cleans those up).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_tmp(path)
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and tmp.exists():
            tmp.unlink()
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {_reason(e, path)}") from None
        raise


def _new_tmp(path: Path) -> Path:
    """An empty, new temporary file next to ``path``, created with the user's umask (a
    ``tempfile.mkstemp`` file is 0600: other users and ranks could not read the result)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _reason(e: OSError, path: Path) -> str:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f" ({free / 2**20:.1f} MiB free on that disk)"
        except OSError:
            pass
    return reason


def remove_orphan_tmp(folder: str | Path) -> list[str]:
    """Delete the temporary files that killed writes left in ``folder``; their names.

    Call it only while holding the folder (no other process may be writing there).
    """
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        if TMP_NAME.fullmatch(p.name) and p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, obj: Any, compact: bool = False) -> None:
    """Indented and newline-terminated, or ``compact`` (no spaces, like the public data files)."""
    if compact:
        atomic_write_text(path, json.dumps(obj, separators=(",", ":")))
    else:
        atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def decode_utf8(path: str | Path, data: bytes) -> str:
    """``data`` (the bytes of ``path``) as text; a leading BOM is dropped.

    Always UTF-8, never the locale's encoding (which would turn a broken file into silently
    wrong text); a bad byte is named with its offset and line, so it can be found in a
    file of millions of lines.
    """
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset "
                         f"{offset:,} (line {line:,}): {e.reason}; save the file as "
                         f"UTF-8") from None


def read_json(path: str | Path, what: str) -> Any:
    """Load JSON with an error that names the file and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = decode_utf8(path, path.read_bytes())
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid JSON {what} file ({e})") from None


def expect_fields(path: Path, where: str, obj, fields: dict[str, type]) -> None:
    """Check that ``obj`` (entry ``where`` of file ``path``) has ``fields`` of these types."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where} is {type(obj).__name__}, expected an object")
    for field, kind in fields.items():
        value = obj.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if field not in obj else f"{value!r}"
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ValueError(f"{path}: {where}.{field} is {got}, expected {names}")
