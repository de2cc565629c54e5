"""Starting a run: the config, the device, the torchrun relaunch, the run folder, user errors.

What runs inside it (batches, precision, the weight step, epochs, checkpoints, evaluation)
is in ``core/loop.py``."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core import config as config_mod
from core.arch import ArchError
from core.cli import command_line, fail, usage, wants_help
from core.data.npz import FeatureError
from core.finite import assert_finite
from core.records import check_tensorboard
from core.tasks.base import DEMO_BUILDERS
from utils import dist
from utils.allocator import keep_freed_memory
from utils.checkpoint import (CheckpointError, load_checkpoint, prune_checkpoints,
                              save_checkpoint)
from utils.io import (WriteError, atomic_write_json, atomic_write_text, read_json,
                      remove_orphan_tmp)

OUTPUTS = ("metrics.json", "arch.json")    # what a run adds to after every epoch
# What a new run writes before its work starts; a run that fails before then leaves no folder.
START_FILES = ("config.yaml", "log.txt", ".lock")
# Keys a --RUN=val/test takes from its checkpoint's config unless a flag gives them: what
# the network's shapes and the data it reads (vocabularies, answers, regions) depend on.
CHECKPOINT_KEYS = ("DATASET", "WORD_VECTORS", "MAX_TOKEN", "MAX_REGIONS", "ANSWER_DICT",
                   "ANS_MIN_COUNT", "HSIZE", "WORD_EMBED_SIZE", "IMG_FEAT_SIZE", "REL_SIZE",
                   "FLAT_MLP_SIZE", "FLAT_GLIMPSES", "ENC_BLOCKS", "DEC_BLOCKS")


class Run:
    """One run, one folder: ``logs/<task>/<kind>/<version>/`` with config, log, outputs.

    Rank 0 holds the folder for the run's life (``.lock``, released by the OS however the
    process ends) and removes what killed writes left there. Everything a run must keep is
    in its checkpoints: the files a run adds to after each epoch (``metrics.json``,
    ``arch.json``: its "outputs") are stored in every checkpoint and rewritten from the one
    a resumed run starts from, so a resumed run's files equal an uninterrupted run's.
    """

    def __init__(self, folder: Path, resume: bool):
        self.folder, self.main, self.resume = folder, dist.is_main(), resume
        self.log_file = folder / "log.txt"
        self.removed_tmp: list[str] = []
        self.working = False        # set by work_starts(): data and network are ready
        if self.main:
            _create_folder(folder, resume)
            _hold(folder)
            self.removed_tmp = remove_orphan_tmp(folder)

    def save_config(self, cfg) -> None:
        """Write the resolved ``config.yaml``: at the start of a new run, and for a resume
        only once its checkpoint has loaded, so that a refused or failed resume leaves the
        saved config as it was."""
        if self.main:
            atomic_write_text(self.folder / "config.yaml", cfg.dump())

    def log(self, message: str, echo: bool = True) -> None:
        """Rank 0 prints (``echo``) and appends to log.txt; other ranks stay silent."""
        if not self.main:
            return
        if echo:
            tqdm.write(message)
        try:
            with self.log_file.open("a") as f:
                f.write(message + "\n")
        except OSError as e:        # e.g. a full disk: the message is still on the console
            tqdm.write(f"(could not append this to {self.log_file}: {e.strerror or e})")

    def work_starts(self) -> None:
        """Data, checkpoint and network are ready: from now on a failed run keeps its folder
        (its log says how far it got)."""
        self.working = True

    def discard_if_unused(self) -> bool:
        """A new run that failed before its work started: remove its folder (only the files
        it wrote at start are there) and say so; True if removed."""
        if not self.main or self.resume or self.working:
            return False
        if any(p.name not in START_FILES for p in self.folder.iterdir()):
            return False
        lock = _HELD.pop(self.folder.resolve(), None)
        if lock is not None:
            lock.close()
        for name in START_FILES:
            (self.folder / name).unlink(missing_ok=True)
        self.folder.rmdir()
        return True

    def checkpoint(self, epoch: int, payload: dict, outputs: dict | None = None,
                   keep: int = 0, best: int | None = None) -> Path:
        """Write ``epochN.pkl`` (with ``outputs``: file name -> JSON content), then the
        ``last`` pointer, then the output files; then delete older checkpoints but the
        newest ``keep`` (0: all), the ``best`` epoch's and what a resume needs."""
        path = self.folder / f"epoch{epoch}.pkl"
        # every rank checks (they hold the same weights), so none waits at the barrier alone
        assert_finite(payload, f"checkpoint {path}")
        outputs = json.loads(json.dumps(outputs or {}))    # plain JSON types only
        if self.main:
            save_checkpoint(path, {**payload, "outputs": outputs})
            atomic_write_text(self.folder / "last", path.name + "\n")
            self._write_outputs(outputs)
            self._prune(epoch, keep, best)
        dist.barrier()
        return path

    def _prune(self, epoch: int, keep: int, best: int | None) -> None:
        deleted, damaged = prune_checkpoints(self.folder, epoch, keep, best)
        for name in damaged:
            self.log(f"warning: {self.folder / name} is damaged (fails its digest): a resume "
                     f"would skip it")
        if deleted:
            kept = f" and the best (epoch{best}.pkl)" if best else ""
            self.log(f"removed {', '.join(deleted)} (CKPT_KEEP = {keep}: the newest {keep}"
                     f"{kept} are kept)")

    def restore_outputs(self, ckpt: dict) -> dict:
        """The outputs stored in ``ckpt``, rewritten into the folder (rank 0). A checkpoint
        from before outputs were stored in it: the files as they are (entries of later
        epochs included)."""
        if "outputs" not in ckpt:
            return {name: read_json(self.folder / name, "run output") for name in OUTPUTS
                    if (self.folder / name).is_file()}
        if self.main:
            self._write_outputs(ckpt["outputs"])
        return ckpt["outputs"]

    def _write_outputs(self, outputs: dict) -> None:
        for name, content in outputs.items():
            atomic_write_json(self.folder / name, content)

    def last_checkpoint(self) -> Path | None:
        """The newest intact checkpoint of this folder; None if it has none yet (a run
        killed before its first checkpoint starts again from scratch).

        A damaged newer one (truncated, empty, failing its digest) is logged and skipped;
        rank 0 decides and every rank gets its choice.
        """
        choice = None
        if self.main:
            try:
                choice = ("found", self._newest_intact())
            except CheckpointError as e:     # every rank stops, none waits for rank 0
                choice = ("error", str(e))
        outcome, value = dist.broadcast(choice)
        if outcome == "error":
            raise CheckpointError(value)
        return None if value is None else self.folder / value

    def _newest_intact(self) -> str | None:
        if self.removed_tmp:
            self.log(f"removed {len(self.removed_tmp)} unfinished temporary file(s) of an "
                     f"interrupted write: {', '.join(self.removed_tmp)}")
        found = sorted((int(m[1]), p) for p in self.folder.glob("epoch*.pkl")
                       if (m := re.fullmatch(r"epoch(\d+)\.pkl", p.name)))
        if not found:
            self.log(f"{self.folder} has no checkpoint yet: starting the run from scratch")
            return None
        damaged = []
        for _, path in reversed(found):
            try:
                load_checkpoint(path)
            except CheckpointError as e:
                damaged.append(path.name)
                self.log(f"warning: {e}")
                continue
            if damaged:
                self.log(f"warning: resuming from {path.name}, the newest intact checkpoint "
                         f"({', '.join(damaged)} damaged: not used)")
            return path.name
        raise CheckpointError(f"{self.folder}: no intact checkpoint to resume from "
                              f"({', '.join(damaged)} damaged, see above); move them away to "
                              f"start the run from scratch")


def _create_folder(folder: Path, resume: bool) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=resume)
    except FileExistsError:
        raise config_mod.ConfigError(
            f"run folder {folder} already exists; pass --RESUME to continue it or "
            f"choose another --VERSION (earlier runs are never overwritten)") from None
    except OSError as e:
        blocker = next((p for p in folder.parents if p.exists()), None)
        where = f" ({blocker} is a file)" if blocker and not blocker.is_dir() else ""
        raise config_mod.ConfigError(f"cannot create the run folder {folder}: "
                                     f"{e.strerror or e}{where}; check --LOG_ROOT") from None


_HELD: dict[Path, object] = {}     # folder -> its open lock file, for this process's life


def _hold(folder: Path) -> None:
    """Lock ``folder`` for this process (flock: a killed process never leaves it locked);
    another process holding it is an error naming it and its PID. Holding it again in the
    same process (tests run several runs of one folder) is allowed."""
    key = folder.resolve()
    if key in _HELD:
        return
    lock = open(folder / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown PID"
        lock.close()
        raise config_mod.ConfigError(
            f"run folder {folder} is in use by another run (process {holder}); two runs "
            f"of one folder would overwrite each other's files: wait for it to end or "
            f"stop it") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _HELD[key] = lock


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "your input is wrong": shown as one line, not a traceback."""
    return (config_mod.ConfigError, CheckpointError, ArchError, FeatureError,
            FileNotFoundError, ValueError, WriteError)


def main(task_cls, kind: str, runner, argv: list[str] | None = None) -> None:
    """A script's body: set up the run, call ``runner(cfg, task, run)``, report user errors.

    Set ``MMNAS_TRACEBACK=1`` to see the full traceback of such an error.
    """
    argv = sys.argv[1:] if argv is None else argv
    _launch_per_gpu(argv, task_cls, kind)
    cfg, run, task = start(task_cls, kind, argv)
    try:
        runner(cfg, task, run)
    except user_errors() as e:
        message = _own_message(str(e))
        if not run.discard_if_unused():     # printed once, below; the log keeps it too
            run.log(f"error: {message}", echo=False)
        if os.environ.get("MMNAS_TRACEBACK"):
            raise
        fail(message)
    if dist.is_main():
        print(f"run folder: {run.folder}")


def _launch_per_gpu(argv: list[str], task_cls, kind: str) -> None:
    """``--GPU=0,1,2,3`` outside torchrun: rerun this script under torchrun, one process per
    listed GPU of this machine (``torchrun --standalone --nproc_per_node=N``)."""
    if "RANK" in os.environ or not torch.cuda.is_available():
        return
    try:
        gpus = str(command_line(argv, task_cls.name, kind, task_cls.datasets).get("GPU", "0"))
    except config_mod.ConfigError:
        return                          # start() reports it
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if len(ids) < 2:
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(ids))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={len(ids)}", sys.argv[0], *argv]
    sys.exit(subprocess.call(cmd, env=env))


def _own_message(text: str) -> str:
    """A data-loader worker wraps errors in its traceback; keep the error's own line."""
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[-1]
    return text


def start(task_cls, kind: str, argv: list[str] | None = None):
    """Flags -> config -> run folder -> task; exits with one clear line on a user error."""
    argv = sys.argv[1:] if argv is None else argv
    dist.init_from_env()
    script = f"{kind}_{task_cls.name}.py"
    if wants_help(argv):
        print(usage(script, task_cls.datasets, argv))
        sys.exit(0)
    try:
        overrides = command_line(argv, task_cls.name, kind, task_cls.datasets)
        inherited = _checkpoint_settings(overrides, kind)
        cfg = config_mod.resolve(task_cls.name, kind, {**inherited, **overrides})
        if cfg.DATASET not in task_cls.datasets:
            raise config_mod.ConfigError(f"DATASET={cfg.DATASET!r}; expected one of "
                                         f"{', '.join(task_cls.datasets)}")
        mode = kind if cfg.RUN_MODE == "train" else cfg.RUN_MODE
        if cfg.RESUME:
            cfg = _resumed_config(cfg, kind, mode, overrides)
        if cfg.TENSORBOARD:
            check_tensorboard()
        if cfg.SEED is None:
            cfg.SEED = int.from_bytes(os.urandom(3), "little")
        if dist.active():       # every rank must agree on the drawn seed and run name
            cfg.SEED, cfg.VERSION = dist.broadcast((cfg.SEED, cfg.VERSION or _default_version(cfg)))
        run = Run(_run_folder(cfg, mode), cfg.RESUME)
    except (config_mod.ConfigError, CheckpointError) as e:
        fail(str(e))
    cfg.freeze()
    seed_everything(cfg.SEED)       # the same on every rank: identical initial weights and paths
    if not cfg.RESUME:
        run.save_config(cfg)        # a resume saves it once its checkpoint has loaded
    run.log(f"== {script} {' '.join(argv)}\n== run folder: {run.folder}\n== config:\n"
            + cfg.dump().rstrip())
    if inherited:
        run.log(f"from the checkpoint's config ({cfg.CKPT_PATH}): "
                + ", ".join(f"{k} {v}" for k, v in inherited.items()))
    use_threads(cfg.THREADS, run.log)
    if cfg.KEEP_FREED_MEMORY:
        run.log(f"memory: {keep_freed_memory()}")
    return cfg, run, task_cls(cfg, run.log)


def use_threads(threads: int, log) -> None:
    """THREADS > 0: this process's CPU threads (torch's intra-op pool); 0: torch's default.
    Several jobs on one machine, each with all its cores, run many times slower."""
    if threads:
        torch.set_num_threads(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    log(f"threads: {torch.get_num_threads()} of {cores} cores"
        f"{'' if threads else ' (THREADS = 0: torch default)'}")


def _checkpoint_settings(overrides: dict, kind: str) -> dict:
    """A checkpoint given on the command line must exist (checked before the run folder is
    made). For --RUN=val/test: its config's CHECKPOINT_KEYS (the dataset and sizes it was
    trained with), which the command line's flags override."""
    path = overrides.get("CKPT_PATH")
    if not path:
        return {}
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (--CKPT_PATH)")
    if kind != "train" or overrides.get("RUN_MODE", "train") == "train":
        return {}
    try:     # mmap: the config without reading the weights; the run loads and checks it all
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    except Exception:       # a released or damaged file: loading it later says what is wrong
        return {}
    return {k: saved[k] for k in CHECKPOINT_KEYS if k in saved and k not in overrides}


def _run_folder(cfg, mode: str) -> Path:
    base = Path(cfg.LOG_ROOT) / cfg.TASK / mode
    if not cfg.VERSION:
        cfg.VERSION = _default_version(cfg, base)
    return base / cfg.VERSION


def _default_version(cfg, base: Path | None = None) -> str:
    """``<dataset>-<timestamp>``, with a counter if that folder exists already."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = f"{cfg.DATASET}-{stamp}", 1
    while base is not None and (base / name).exists():
        n += 1
        name = f"{cfg.DATASET}-{stamp}-{n}"
    return name


def _resumed_config(cfg, kind: str, mode: str, overrides: dict):
    """The saved config of the run ``--RESUME`` continues, with the command line's changes
    where a key allows one (``Key.defines_run`` False); any other change is refused."""
    base = Path(cfg.LOG_ROOT) / cfg.TASK / mode
    if not cfg.VERSION:
        raise config_mod.ConfigError(f"--RESUME needs the --VERSION of the run to continue "
                                     f"(a folder in {base})")
    folder = base / cfg.VERSION
    saved_file = folder / "config.yaml"
    if not folder.is_dir():
        raise config_mod.ConfigError(f"--RESUME: run folder {folder} does not exist; expected "
                                     f"the --VERSION (and --LOG_ROOT) of an earlier run")
    if not saved_file.is_file() and not any(folder.glob("epoch*.pkl")):
        return cfg      # killed before it wrote anything: the run starts again, as asked now
    if not saved_file.is_file():
        raise config_mod.ConfigError(f"--RESUME: {saved_file} does not exist, so {folder} holds "
                                     f"no run to continue; start it afresh under another "
                                     f"--VERSION")
    saved = config_mod.read_saved(saved_file)
    changed = config_mod.resume_changes(saved, overrides)
    if changed:
        allowed = ", ".join(n for n, k in config_mod.KEYS.items() if not k.defines_run)
        raise config_mod.ConfigError(
            f"--RESUME of {folder} would change the run: {'; '.join(changed)}; drop the "
            f"flag(s) or start a new --VERSION (a resume may change only {allowed})")
    return config_mod.resolve(cfg.TASK, kind, {**saved, **overrides})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_of(cfg, log) -> torch.device:
    if torch.cuda.is_available():
        if dist.active():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        ids = [int(g) for g in str(cfg.GPU).split(",") if g.strip() != ""]
        return torch.device(f"cuda:{ids[0] if ids else 0}")
    log(f"no GPU found: running on CPU{f' ({dist.world()} processes, gloo)' if dist.active() else ''}")
    if cfg.AMP == "bf16" and not cpu_has_bf16():
        # oneDNN has no bf16 LSTM (nor fast bf16 matmuls) on such CPUs: it fails mid-epoch
        raise config_mod.ConfigError(
            f"AMP = 'bf16', but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
            f"bfloat16 support in oneDNN (it needs AVX512-BF16 or AMX); use --AMP=off")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU (AVX512-BF16 / AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def ensure_data(cfg, task, log) -> None:
    """``--DATASET=demo``: build the embedded synthetic data once (seconds)."""
    if cfg.DATASET == "demo":
        t = time.time()
        build = DEMO_BUILDERS.get(task.name)
        if build is None:
            raise ValueError(f"--DATASET=demo: no demo data builder registered for task "
                             f"'{task.name}' (import the demo package first, as the scripts do)")
        stats = build(Path(cfg.DATA_ROOT))
        log(f"demo data in {cfg.DATA_ROOT} ready ({time.time() - t:.1f} s): "
            f"{ {k: v for k, v in stats.items() if not isinstance(v, dict)} }")
