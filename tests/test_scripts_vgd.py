"""Visual grounding end to end on the demo data: search, train, test — through the scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.run import start
from core.tasks.vgd import VGDTask
from core.train import run_train

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--DATASET=demo", "--SUBSET=64", "--BS=16", "--NW=0", "--SEED=3", "--PICTURES=false"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, demo_data):
    base = tmp_path_factory.mktemp("vgd")
    return base, [f"--DATA_ROOT={demo_data}", f"--LOG_ROOT={base / 'logs'}"]


def test_search_then_train_the_found_architecture(paths):
    base, roots = paths
    out = subprocess.run([sys.executable, "search_vgd.py", *QUICK, "--SUBSET=16", *roots,
                          "--MAX_EPOCH=1", "--ARCH_START_EPOCH=0", "--VERSION=s"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))   # a later flag wins
    assert out.returncode == 0, out.stderr[-2000:]
    folder = base / "logs" / "vgd" / "search" / "s"
    assert "epoch1" in json.loads((folder / "arch.json").read_text())
    assert "arg-max sub-network on the architecture split: acc" in (folder / "log.txt").read_text()

    cfg, run, task = start(VGDTask, "train", QUICK + roots + [
        f"--ARCH_PATH={folder / 'arch.json'}", "--ARCH_EPOCH=1", "--MAX_EPOCH=1", "--VERSION=t"])
    metrics = run_train(cfg, task, run)
    assert 0.0 <= metrics["acc"] <= 100.0 and metrics["n"] == 64
    assert "baseline on val: random_proposal_acc" in (run.folder / "log.txt").read_text()


def test_test_run_writes_predictions_per_split(paths):
    base, roots = paths
    ckpt = base / "logs" / "vgd" / "train" / "t" / "epoch1.pkl"
    if not ckpt.exists():      # the previous test trains it; run alone, train here
        cfg, run, task = start(VGDTask, "train", QUICK + roots + [
            "--ARCH_PATH=arch/mmnas_vgd.json", "--MAX_EPOCH=1", "--VERSION=t"])
        run_train(cfg, task, run)
    cfg, run, task = start(VGDTask, "train", QUICK + roots + ["--RUN=test", f"--CKPT_PATH={ckpt}",
                                                              "--VERSION=u"])
    results = run_train(cfg, task, run)
    assert set(results) == {"testA", "testB"}
    preds = json.loads((run.folder / "result_testA_t_epoch1.json").read_text())
    assert len(preds) == 64 and set(preds[0]) == {"sent_id", "box", "score", "correct"}
    assert results["testA"]["acc"] == pytest.approx(100 * sum(p["correct"] for p in preds) / 64)
