"""Image–text matching end to end on the demo data: search, train, test — through the scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.run import start
from core.tasks.itm import ITMTask
from core.train import run_train

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--DATASET=demo", "--SUBSET=12", "--BS=16", "--NW=0", "--SEED=3", "--PICTURES=false",
         "--ITM_NEG_CANDIDATES=8", "--ITM_HARD_NEG_EPOCH=0"]   # mine from the first epoch


@pytest.fixture(scope="module")
def paths(tmp_path_factory, demo_data):
    base = tmp_path_factory.mktemp("itm")
    return base, [f"--DATA_ROOT={demo_data}", f"--LOG_ROOT={base / 'logs'}"]


def test_search_train_and_test(paths):
    base, roots = paths
    out = subprocess.run([sys.executable, "search_itm.py", *QUICK, *roots, "--MAX_EPOCH=1",
                          "--ARCH_START_EPOCH=0", "--VERSION=s"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    search = base / "logs" / "itm" / "search" / "s"
    log = (search / "log.txt").read_text()
    assert "arg-max sub-network on the architecture split: i2t" in log
    # SUBSET=12 images, 60 captions: the architecture split is the last 10 %, 6 captions of
    # 2 images (1 and 5 of theirs): chance R@1 is 50 % both ways
    assert "baseline on the 6 scored samples of the architecture split: chance_r1_i2t 50.00 " \
        "| chance_r1_t2i 50.00" in log

    cfg, run, task = start(ITMTask, "train", QUICK + roots + [
        f"--ARCH_PATH={search / 'arch.json'}", "--ARCH_EPOCH=1", "--MAX_EPOCH=1", "--VERSION=t"])
    metrics = run_train(cfg, task, run)
    assert set(metrics) == {"i2t", "t2i", "rsum"} and 0 <= metrics["i2t"]["r1"] <= 100
    assert "baseline on dev: chance_r1_i2t" in (run.folder / "log.txt").read_text()

    cfg, run, task = start(ITMTask, "train", QUICK + roots + [
        "--RUN=test", f"--CKPT_PATH={run.folder / 'epoch1.pkl'}", "--VERSION=u"])
    results = run_train(cfg, task, run)
    scores = np.load(run.folder / "scores_test_t_epoch1.npy")
    assert scores.shape == (12, 60) and ((0 <= scores) & (scores <= 1)).all()
    saved = json.loads((run.folder / "metrics_test.json").read_text())
    assert saved == results and saved["test"]["rsum"] == pytest.approx(
        sum(saved["test"][d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")))
