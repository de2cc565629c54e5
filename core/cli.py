"""Command line: the original's flags plus ``--KEY=VALUE`` for every config key, a user's
``--CONFIG`` file, ``--CKPT_V``/``--CKPT_E`` (a run's checkpoint by version and epoch)."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from core.config import (KEYS, ConfigError, check_value, close_keys, parse_flag_value,
                         read_yaml, resolve)

# The original's flag names -> config keys.
ALIASES = {"RUN": "RUN_MODE", "BS": "BATCH_SIZE", "NW": "NUM_WORKERS", "SPLIT": "TRAIN_SPLIT",
           "GENO_EPOCH": "ARCH_EPOCH"}
RUN_MODES = KEYS["RUN_MODE"].choices
# Flags of the command line only, not config keys: ``command_line`` turns them into keys.
COMMAND_LINE_ONLY = {
    "CONFIG": ("FILE", "a YAML file of your own settings (KEY: value, plus 'search:' and "
               "'train:' sections); order: declared defaults < cfgs/<task>.yml < --CONFIG "
               "< flags"),
    "CKPT_V": ("VERSION", "load the checkpoint of run VERSION of this script "
               "(logs/<task>/<train|search>/VERSION/), instead of --CKPT_PATH, as MCAN and "
               "OpenVQA do; its last checkpoint unless --CKPT_E says which"),
    "CKPT_E": ("N", "with --CKPT_V: its epochN.pkl"),
}
# --help groups: each starts at its key and runs to the next one's, in KEYS' order.
GROUPS = {"run": "TASK", "data": "WORD_VECTORS", "model": "HSIZE",
          "optimisation": "BATCH_SIZE", "search": "ENC_CANDIDATES"}


def parse_args(argv: list[str], datasets: tuple[str, ...]) -> dict:
    """``['--RUN', 'val', '--BS=8', '--RESUME']`` -> ``{'RUN_MODE': 'val', ...}``; the
    command-line-only flags (``COMMAND_LINE_ONLY``) are returned under their own names."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; flags look like "
                              f"--KEY=VALUE")
        name, eq, text = arg[2:].partition("=")
        name = ALIASES.get(name, name)
        if name not in KEYS and name not in COMMAND_LINE_ONLY:
            raise ConfigError(f"command line: unknown flag --{arg[2:].split('=')[0]}; close "
                              f"matches: {close_keys(name)} (--help lists all keys)")
        if not eq:
            if name in KEYS and KEYS[name].type == "bool" and (
                    i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"          # a bare --RESUME
            elif i + 1 < len(argv):
                i, text = i + 1, argv[i + 1]
            else:
                raise ConfigError(f"command line: --{name} needs a value")
        value = parse_flag_value(text)
        if name in ("CONFIG", "CKPT_V") or (
                name in KEYS and KEYS[name].type == "str" and not isinstance(value, str)):
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


def command_line(argv: list[str], task: str, kind: str, datasets: tuple[str, ...]) -> dict:
    """The config keys a command line sets: its ``--CONFIG`` file under its flags, and
    ``--CKPT_V``/``--CKPT_E`` turned into ``CKPT_PATH``."""
    flags = parse_args(argv, datasets)
    config_file = flags.pop("CONFIG", None)
    version, epoch = flags.pop("CKPT_V", None), flags.pop("CKPT_E", None)
    values = {**user_config(Path(config_file), kind, datasets), **flags} if config_file \
        else flags
    if version is not None or epoch is not None:
        if "CKPT_PATH" in flags:
            raise ConfigError(f"command line: --CKPT_PATH={flags['CKPT_PATH']} and --CKPT_V/"
                              f"--CKPT_E both name a checkpoint; expected one of them")
        values["CKPT_PATH"] = str(version_checkpoint(task, kind, values, version, epoch))
    return values


def user_config(path: Path, kind: str, datasets: tuple[str, ...]) -> dict:
    """The keys of a ``--CONFIG`` file (top level and its ``kind`` section), each checked."""
    if not path.is_file():
        raise ConfigError(f"--CONFIG={path}: no such file; expected a YAML file of KEY: value "
                          f"(--help lists the keys)")
    values = {}
    for name, value in read_yaml(path, kind).items():
        name = ALIASES.get(name, name) if isinstance(name, str) else name
        values[name] = check_value(name, value, str(path))
    if "DATASET" in values and values["DATASET"] not in datasets:
        raise ConfigError(f"{path}: DATASET = {values['DATASET']!r}; expected one of "
                          f"{', '.join(datasets)}")
    return values


def version_checkpoint(task: str, kind: str, values: dict, version, epoch) -> Path:
    """``--CKPT_V=t1 --CKPT_E=13`` -> ``<LOG_ROOT>/<task>/<kind>/t1/epoch13.pkl``, which must
    exist; without ``--CKPT_E`` the run's last checkpoint (its ``last`` pointer)."""
    if version is None:
        raise ConfigError(f"command line: --CKPT_E={epoch} needs --CKPT_V, the VERSION of the "
                          f"run whose checkpoint to load")
    if not version or "/" in version or "\\" in version or version in (".", ".."):
        raise ConfigError(f"command line: --CKPT_V={version!r}; expected a run's VERSION (a "
                          f"folder name without '/')")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)
                              or epoch < 1):
        raise ConfigError(f"command line: --CKPT_E={epoch!r}; expected an epoch number >= 1")
    base = Path(resolve(task, kind, values).LOG_ROOT) / task / kind
    folder = base / version
    if not folder.is_dir():
        runs = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise ConfigError(f"--CKPT_V={version}: no run folder {folder}; expected the VERSION "
                          f"of an earlier {kind}_{task}.py run (runs in {base}: "
                          f"{', '.join(runs[-8:]) or 'none'})")
    if epoch is None:
        last = folder / "last"
        if not last.is_file():
            raise ConfigError(f"--CKPT_V={version}: {folder} has no checkpoint yet (no 'last' "
                              f"file); pass --CKPT_E=N for its epochN.pkl")
        path = folder / last.read_text().strip()
    else:
        path = folder / f"epoch{epoch}.pkl"
    if not path.is_file():
        held = sorted((p for p in folder.glob("epoch*.pkl")
                       if re.fullmatch(r"epoch\d+\.pkl", p.name)),
                      key=lambda p: int(p.stem[5:]))
        raise ConfigError(f"--CKPT_V={version}{f' --CKPT_E={epoch}' if epoch else ''}: no "
                          f"checkpoint {path}; {folder} holds "
                          f"{', '.join(p.name for p in held) or 'no checkpoint'}")
    return path


# ---- --help ---------------------------------------------------------------------------------

def usage(script: str, datasets: tuple[str, ...], argv: list[str] = ()) -> str:
    """The flags, and every key with the value ``script`` uses (its task's cfgs/ file, its
    kind's section, and the flags of ``argv``: ``--DATASET=demo --help`` shows the demo's),
    grouped, then examples."""
    kind, task = _kind_and_task(script)
    run_flag = f"[--RUN={{{','.join(RUN_MODES)}}}] " if kind == "train" else ""
    lines = [f"usage: python3 {script} {run_flag}[--DATASET={{{','.join(datasets)}}}] "
             f"[--KEY=VALUE ...]", ""]
    values, note = _values_used(task, kind, datasets, argv)
    lines += _wrapped(f"Values {script} uses{note}: declared default < cfgs/{task}.yml "
                      f"(its '{kind}:' section) < --CONFIG file < flags; '(default X)' where "
                      f"the value is not the declared default. Original flag names: --RUN "
                      f"(RUN_MODE), --BS, --NW, --SPLIT, --GENO_EPOCH (ARCH_EPOCH), --RESUME.",
                      "", "") + [""]
    lines.append("command line only:")
    for name, (meta, doc) in COMMAND_LINE_ONLY.items():
        lines += _wrapped(doc, f"  --{name}={meta}".ljust(30) + " ")
    starts = {key: group for group, key in GROUPS.items()}
    for name, key in KEYS.items():
        if name in starts:
            only = " (search scripts only)" if starts[name] == "search" and kind != "search" \
                else ""
            lines += ["", f"{starts[name]}{only}:"]
        value = values.get(name, key.default)
        default = "" if value == key.default else f"(default {_shown(key.default)}) "
        lines += _wrapped(f"{default}{key.type}: {key.doc}",
                          f"  --{name} {_shown(value)}".ljust(30) + " ")
    lines += ["", "examples:"] + [f"  {e}" for e in examples(task, kind, datasets)]
    return "\n".join(lines)


def _kind_and_task(script: str) -> tuple[str, str]:
    match = re.fullmatch(r"(search|train)_(\w+)\.py", Path(script).name)
    return (match[1], match[2]) if match else ("train", KEYS["TASK"].default)


def _values_used(task: str, kind: str, datasets, argv) -> tuple[dict, str]:
    """(resolved values, a note); bad flags fall back to the script's own values."""
    argv = [a for a in argv if a not in ("-h", "--help")]
    try:
        values = resolve(task, kind, command_line(argv, task, kind, datasets)).to_dict()
        return values, f" (with {' '.join(argv)})" if argv else ""
    except ConfigError as e:
        return resolve(task, kind, {}).to_dict(), f" (flags ignored: {e})"


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    if isinstance(value, list):         # as a flag takes it: --LR_DECAY_EPOCHS=[10,12]
        return f"[{','.join(_shown(v) for v in value)}]"
    return str(value)


def _wrapped(text: str, first: str, indent: str = " " * 8) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent=first, subsequent_indent=indent) or [first]


def examples(task: str, kind: str, datasets: tuple[str, ...]) -> list[str]:
    """Two or three commands a user starts from."""
    real = next((d for d in datasets if d != "demo"), datasets[0])
    data = f"--DATASET={real}"
    if kind == "search":
        return [f"python3 search_{task}.py --DATASET=demo        # the embedded demo data",
                f"python3 search_{task}.py {data} --VERSION=s1   # the real data "
                f"(dataset_setup.md)",
                f"python3 search_{task}.py {data} --VERSION=s1 --RESUME   # continue it"]
    return [f"python3 train_{task}.py {data} --ARCH_PATH=arch/mmnas_{task}.json --VERSION=t1",
            f"python3 train_{task}.py {data} --RUN=val --CKPT_V=t1 --CKPT_E=13   # evaluate "
            f"epoch 13 of run t1",
            f"python3 train_{task}.py --CONFIG=my.yml --ARCH_PATH=logs/{task}/search/s1/"
            f"arch.json --ARCH_EPOCH=30"]


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
