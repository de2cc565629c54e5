"""Command line: the original's flags plus ``--KEY=VALUE`` for every config key."""
from __future__ import annotations

import sys

from core.config import KEYS, ConfigError, close_keys, parse_flag_value

# The original's flag names -> config keys.
ALIASES = {"RUN": "RUN_MODE", "BS": "BATCH_SIZE", "NW": "NUM_WORKERS", "SPLIT": "TRAIN_SPLIT",
           "GENO_EPOCH": "ARCH_EPOCH"}
RUN_MODES = KEYS["RUN_MODE"].choices


def usage(script: str, datasets: tuple[str, ...]) -> str:
    lines = [f"usage: python3 {script} [--RUN={{{','.join(RUN_MODES)}}}] "
             f"[--DATASET={{{','.join(datasets)}}}] [--KEY=VALUE ...]", "",
             "flags (original names): --RUN, --BS, --NW, --SPLIT, --ARCH_EPOCH/--GENO_EPOCH, "
             "--RESUME; every config key as --KEY=VALUE:", ""]
    for name, key in KEYS.items():
        lines.append(f"  --{name:<18} {key.type:<11} default {key.default!r}: {key.doc}")
    return "\n".join(lines)


def parse_args(argv: list[str], datasets: tuple[str, ...]) -> dict:
    """``['--RUN', 'val', '--BS=8', '--RESUME']`` -> ``{'RUN_MODE': 'val', ...}``."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; flags look like "
                              f"--KEY=VALUE")
        name, eq, text = arg[2:].partition("=")
        name = ALIASES.get(name, name)
        if name not in KEYS:
            raise ConfigError(f"command line: unknown flag --{arg[2:].split('=')[0]}; close "
                              f"matches: {close_keys(name)} (--help lists all keys)")
        if not eq:
            if KEYS[name].type == "bool" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"          # a bare --RESUME
            elif i + 1 < len(argv):
                i, text = i + 1, argv[i + 1]
            else:
                raise ConfigError(f"command line: --{name} needs a value")
        value = parse_flag_value(text)
        if KEYS[name].type == "str" and not isinstance(value, str):
            value = text               # e.g. --VERSION=2024 or --GPU=0 stay strings
        out[name] = value
        i += 1
    if out.get("RUN_MODE", "train") not in RUN_MODES:
        raise ConfigError(f"command line: --RUN={out['RUN_MODE']!r}; expected one of "
                          f"{', '.join(RUN_MODES)}")
    if "DATASET" in out and out["DATASET"] not in datasets:
        raise ConfigError(f"command line: --DATASET={out['DATASET']!r}; expected one of "
                          f"{', '.join(datasets)}")
    return out


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
