"""Tiny real runs of the scripts, killed with SIGKILL at chosen points, and run-folder checks.

``python3 tests/runkit.py PLAN.json RESULT.json`` runs the plan's steps one after the other:
``{"script": "search_vqa.py", "argv": [...], "kill": "step:2"}`` runs the real script in a
forked child (torch is imported once, before the forks, so each run costs only its work)
that SIGKILLs itself at the chosen point; ``{"move": [src, dst]}`` renames a folder. Kill
points (counted in that child):
  ``step:N``   before its N-th weight step (mid-epoch);
  ``write:N``  during its N-th checkpoint write: half the file is on disk, not yet renamed;
  ``saved:N``  just after its N-th checkpoint file is complete, before the ``last`` pointer
               and the output files (metrics.json, arch.json) are written.
RESULT.json gets each run's exit status (-9: killed by SIGKILL).
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.records import RECORDS, TIMING_FIELDS  # noqa: E402
# A VQA data tree from the demo generator at a tiny size, run as --DATASET=vqa (the demo
# dataset would build its full size first).
DATA_SIZES = {"train": 16, "val": 4, "test": 2, "vg": 1, "min_questions": 2, "max_questions": 2}
ARCH = {"epoch1": {"enc": [["self_att_64"]], "dec": [["rel_self_att_64"], ["guided_att_64"]]}}


def build_data(base: Path) -> list[str]:
    """The data and the flags of a tiny run (2 epochs of 4 steps) on it."""
    from demo.vqa import build_vqa_demo
    build_vqa_demo(base / "data", seed=0, sizes=DATA_SIZES)
    (base / "arch.json").write_text(json.dumps(ARCH))
    return ["--DATASET=vqa", f"--DATA_ROOT={base / 'data'}", f"--LOG_ROOT={base / 'logs'}",
            "--WORD_VECTORS=hash", "--ANSWER_DICT=", "--ANS_MIN_COUNT=1", "--MAX_REGIONS=8",
            "--HSIZE=64", "--FLAT_MLP_SIZE=16", "--REL_SIZE=4", "--WORD_EMBED_SIZE=16",
            "--ENC_BLOCKS=1", "--DEC_BLOCKS=2", "--BS=8", "--NW=0", "--SEED=5",
            "--MAX_EPOCH=2", "--LR_WARMUP_EPOCHS=0", "--PICTURES=false"]


def search_flags() -> list[str]:
    return ["--ARCH_START_EPOCH=0", "--ARCH_STEP_EVERY=1"]


def train_flags(base: Path) -> list[str]:
    return [f"--ARCH_PATH={base / 'arch.json'}", "--ARCH_EPOCH=1"]


# ---- the driver ---------------------------------------------------------------------------

def run_plan(plan: list[dict], result: Path) -> None:
    # Imported before the forks, so that every run starts warm (the first optimiser
    # imports torch._dynamo: seconds).
    import torch._dynamo  # noqa: F401
    import core.search  # noqa: F401
    import core.tasks.vqa  # noqa: F401
    import core.train  # noqa: F401
    codes = []
    for step in plan:
        if "move" in step:
            os.rename(*step["move"])
            continue
        pid = os.fork()
        if pid == 0:
            _child(step)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    result.write_text(json.dumps(codes))


def _child(step: dict) -> None:
    code = 1
    try:
        _arm(step.get("kill"))
        sys.argv = [step["script"], *step["argv"]]
        runpy.run_path(str(REPO / step["script"]), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _arm(kill: str | None) -> None:
    """Install the kill point ``event:N`` (see the module doc)."""
    if not kill:
        return
    event, nth = kill.split(":")
    seen = [0]

    def now() -> bool:
        seen[0] += 1
        return seen[0] == int(nth)

    def die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if event == "step":
        import core.loop     # the one epoch function of search and training calls it there

        def step(*args, _real=core.loop.weight_step, **kwargs):
            if now():
                die()
            return _real(*args, **kwargs)
        core.loop.weight_step = step
    elif event == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if now():
                f.flush()
                f.truncate(f.tell() // 2)
                f.flush()
                die()
        torch.save = save
    elif event == "saved":
        import core.run

        def saved(*args, _real=core.run.save_checkpoint, **kwargs):
            _real(*args, **kwargs)
            if now():
                die()
        core.run.save_checkpoint = saved
    else:
        raise ValueError(f"unknown kill point {kill!r}")


# ---- run-folder checks --------------------------------------------------------------------

def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_run(a: Path, b: Path, skip=("log.txt", ".lock")) -> None:
    """Two run folders hold the same files: checkpoints tensor by tensor (their digests
    included), every other file byte for byte."""
    names = sorted(files_of(a))
    assert names == sorted(files_of(b)), (names, sorted(files_of(b)))
    for name in names:
        if name in skip:
            continue
        if name.endswith(".pkl"):
            _assert_same(torch.load(a / name, weights_only=True),
                         torch.load(b / name, weights_only=True), name)
        elif name == RECORDS:       # the same numbers; only the timings differ
            assert _untimed(a / name) == _untimed(b / name), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in path.read_text().splitlines()]


def _assert_same(x, y, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert list(x) == list(y), where
        for k in x:
            _assert_same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, (where, x, y)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_plan(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
