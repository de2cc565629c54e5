"""What every demo builder shares: sizes, the completion marker, the command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Callable

from utils.io import atomic_write_json

try:
    import fcntl
except ImportError:         # Windows
    fcntl = None


def resolve_sizes(defaults: dict, sizes: dict | None) -> dict:
    """``defaults`` updated by ``sizes``; unknown keys or negative counts are errors."""
    merged = {**defaults, **(sizes or {})}
    unknown = set(merged) - set(defaults)
    if unknown:
        raise ValueError(f"unknown size keys: {sorted(unknown)}")
    if any(not isinstance(v, int) or v < 0 for v in merged.values()):
        raise ValueError(f"sizes must be non-negative integers: {merged}")
    return merged


def built_once(marker: Path, version: str, seed: int, sizes: dict,
               build: Callable[[], dict]) -> dict:
    """The stats of the build under ``marker``'s folder: the stored ones if ``marker`` records
    a finished build of this exact version, seed and sizes, else ``build()``'s. The marker is
    removed first and written last, so a half-finished build is never taken for a complete one.
    """
    cached = read_marker(marker, version, seed, sizes)
    if cached is not None:
        return cached
    with exclusive(marker.parent):
        cached = read_marker(marker, version, seed, sizes)    # built while we waited
        if cached is not None:
            return cached
        marker.unlink(missing_ok=True)
        stats = build()
        atomic_write_json(marker, {"version": version, "seed": seed, "sizes": sizes,
                                   "stats": stats}, compact=True)
    return stats


@contextlib.contextmanager
def exclusive(folder: Path):
    """One builder at a time in ``folder``: the ranks of a first ``torchrun`` on the demo (or
    parallel test workers) would otherwise write, and pack, the same files at once. The
    others wait here, then find the finished build's marker. (No lock where ``fcntl`` is
    missing, i.e. on Windows.)"""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".demo_lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)      # released when the file closes
        yield


def read_marker(marker: Path, version: str, seed: int, sizes: dict) -> dict | None:
    """The stored stats if ``marker`` records a finished build of this exact config."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") == version and data.get("seed") == seed and data.get("sizes") == sizes:
        return data.get("stats")
    return None


def cli(description: str, marker_dir: str, build: Callable[..., dict],
        argv: list[str] | None = None) -> None:
    """``python3 -m demo.<task> [--root R] [--seed N] [--force]``: build, print stats."""
    args = _parser(description).parse_args(argv)
    _build_and_print(marker_dir, build, args)


def cli_tasks(description: str, builders: dict[str, tuple[str, Callable[..., dict]]],
              argv: list[str] | None = None) -> None:
    """``python3 -m demo [--task T|all] [--root R] [--seed N] [--force]``: build the demo of
    one task or of all of them (``builders``: task -> (marker folder, builder)), print stats."""
    parser = _parser(description)
    parser.add_argument("--task", choices=[*builders, "all"], default="all",
                        help="the task whose demo to build (default: all)")
    args = parser.parse_args(argv)
    for name in builders if args.task == "all" else [args.task]:
        print(f"{name}:")
        _build_and_print(*builders[name], args)


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default="datasets/demo", help="demo root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the completion marker matches")
    return parser


def _build_and_print(marker_dir: str, build: Callable[..., dict], args) -> None:
    if args.force:
        (Path(args.root) / marker_dir / ".demo_complete").unlink(missing_ok=True)
    start = time.perf_counter()
    stats = build(Path(args.root), seed=args.seed)
    print(json.dumps(stats, indent=2))
    print(f"elapsed_s: {time.perf_counter() - start:.2f}")
