"""A tiny trained VQA model on tiny demo-generated data, for tests that need a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from runkit import build_data, train_flags


def train_tiny(base: Path, *extra: str) -> tuple[list[str], Path]:
    """Train one step (8 questions) at H = 64 under ``base``; returns the flags of the data
    and logs (``--DATASET=vqa --DATA_ROOT=... --LOG_ROOT=... --WORD_VECTORS=hash ...``) and
    the checkpoint."""
    from core.run import start
    from core.tasks.vqa import VQATask
    from core.train import run_train
    flags = build_data(base)
    cfg, run, task = start(VQATask, "train", [*flags, *train_flags(base), "--MAX_EPOCH=1",
                                              "--VERSION=tiny", "--SUBSET=8", *extra])
    run_train(cfg, task, run)
    return flags, run.folder / "epoch1.pkl"


def val_question(data: Path) -> tuple[dict, Path]:
    """The first val question of the data tree and its image's feature file."""
    questions = json.loads((data / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json")
                           .read_text())["questions"]
    q = questions[0]
    return q, data / "coco_extract" / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg.npz"
