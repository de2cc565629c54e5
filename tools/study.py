"""Does the search beat random architectures? One command per task (see README):

    python3 tools/study.py --task vqa --DATASET=demo [--quick] [--seeds 3] [--random 8]
                           [--ARCH_PATH=arch.json --ARCH_EPOCH=N] [--KEY=VALUE ...]

Every other ``--KEY=VALUE`` goes to every search and training of the study;
``--search="--MAX_EPOCH=3 ..."`` and ``--train="..."`` to one kind only. Writes ``table.md``, ``study.json``
and ``study.png`` to ``<LOG_ROOT>/<task>/study/<VERSION>/``; runs again with the same
``--VERSION`` reuse the finished runs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402,F401  (registers the --DATASET=demo builders)
from core.cli import fail  # noqa: E402
from core.run import user_errors  # noqa: E402
from tools.study_arms import Plan, run_study  # noqa: E402
from core.tasks.itm import ITMTask  # noqa: E402
from core.tasks.vgd import VGDTask  # noqa: E402
from core.tasks.vqa import VQATask  # noqa: E402

TASKS = {"vqa": VQATask, "vgd": VGDTask, "itm": ITMTask}
# The full study on the demo (2 searches + 44 trainings), (shared, search, train) flags:
# shorter trainings than the demo configs' own, sized for about an hour per task on 2 idle
# CPU cores from the demo's README timings (VQA ~29 s, VGD ~49 s per full epoch). ITM: one
# epoch of random negatives at B = 32 (156 steps; ~95 s plus ~40 s to rank the 100 dev images
# against 500 captions), searches of 2 epochs scoring 50 images of the architecture split.
FULL = {"vqa": (["--SUBSET=4000"], ["--MAX_EPOCH=4"], ["--MAX_EPOCH=4", "--LR_DECAY_EPOCHS=[3]"]),
        "vgd": (["--SUBSET=2000"], ["--MAX_EPOCH=3"], ["--MAX_EPOCH=3", "--LR_DECAY_EPOCHS=[2]"]),
        "itm": (["--BS=32", "--ITM_HARD_NEG_EPOCH=99", "--LR_DECAY_EPOCHS=[]"],
                ["--MAX_EPOCH=2", "--ARCH_START_EPOCH=1", "--ARCH_EVAL_SAMPLES=250"],
                ["--MAX_EPOCH=1"])}
# --quick: the same path at tiny sizes (the test suite runs it).
QUICK = {"all": ["--HSIZE=64", "--FLAT_MLP_SIZE=16", "--REL_SIZE=4", "--BS=16",
                 "--MAX_EPOCH=1", "--LR_WARMUP_EPOCHS=0", "--EVAL_BATCH_SIZE=64"],
         "search": ["--ARCH_START_EPOCH=0", "--ARCH_STEP_EVERY=1"],
         "vqa": ["--SUBSET=48"], "vgd": ["--SUBSET=48"],
         "itm": ["--SUBSET=8", "--ITM_NEG_CANDIDATES=5"]}


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole path in seconds")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 3; --quick: 2)")
    p.add_argument("--random", type=int, help="random architectures (default 8; --quick: 2)")
    p.add_argument("--ARCH_PATH", default="", help="train this architecture, do not search")
    p.add_argument("--ARCH_EPOCH", type=int, default=0)
    p.add_argument("--SEED", type=int, default=0, help="first seed (seeds SEED, SEED+1, ...)")
    p.add_argument("--VERSION", default="", help="study name (default: a timestamp)")
    p.add_argument("--LOG_ROOT", default="logs")
    p.add_argument("--search", default="", help='flags for the searches only: --search="--MAX_EPOCH=3"')
    p.add_argument("--train", default="", help='flags for the trainings only: --train="--MAX_EPOCH=3"')
    args, flags = p.parse_known_args(argv)
    default_seeds, default_random = (2, 2) if args.quick else (3, 8)
    args.seeds = default_seeds if args.seeds is None else args.seeds
    args.random = default_random if args.random is None else args.random
    if args.seeds < 1 or args.random < 0:
        p.error(f"--seeds {args.seeds} --random {args.random}: expected seeds >= 1, random >= 0")
    return args, flags


def plan_of(args, flags: list[str]) -> Plan:
    if args.quick:
        shared, search, train = QUICK["all"] + QUICK[args.task], QUICK["search"], []
    else:
        shared, search, train = FULL[args.task]
    version = args.VERSION or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Plan(TASKS[args.task], Path(args.LOG_ROOT) / args.task / "study" / version,
                seeds=[args.SEED + k for k in range(args.seeds)], n_random=args.random,
                flags=[*shared, *flags], search_flags=[*search, *shlex.split(args.search)],
                train_flags=[*train, *shlex.split(args.train)],
                arch_path=args.ARCH_PATH, arch_epoch=args.ARCH_EPOCH)


def main(argv: list[str] | None = None) -> dict:
    args, flags = parse(sys.argv[1:] if argv is None else argv)
    plan = plan_of(args, flags)
    plan.folder.mkdir(parents=True, exist_ok=True)
    try:
        return run_study(plan)
    except user_errors() as e:
        if os.environ.get("MMNAS_TRACEBACK"):
            raise
        fail(str(e))


if __name__ == "__main__":
    main()
