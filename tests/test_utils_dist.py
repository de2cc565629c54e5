"""Two CPU processes (gloo, under torchrun) step exactly like one with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# no dropout: the two runs must draw nothing at random that the ranks would split differently
COMMON = ["--DATASET=demo", "--SUBSET=64", "--BS=16", "--NW=0", "--SEED=5", "--DROPOUT_R=0.0",
          "--MAX_EPOCH=1"]


def run(script, args, procs, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if procs == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", script]
    out = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def roots(tmp_path_factory, demo_data):
    base = tmp_path_factory.mktemp("ddp")
    return base, [f"--DATA_ROOT={demo_data}", f"--LOG_ROOT={base / 'logs'}"]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


# AttFlat's glimpse bias shifts every logit of a softmax equally: its true gradient is zero,
# and Adam turns the rounding noise left in it into full-size steps of either sign.
ZERO_GRADIENT = ("attflat_img.mlp.linear.bias", "attflat_lang.mlp.linear.bias")


def _assert_close(a, b):
    """Equal to float tolerance, but for a handful of the ~2 M weights: where a gradient is
    near zero, the two processes' differently rounded sums can differ in sign, and Adam
    turns either sign into a full-size step (seen: at most 7 elements, under 4e-4 apart; a
    missing all-reduce would move most of them)."""
    assert a.keys() == b.keys()
    off, total = 0, 0
    for k in a:
        if k.endswith(ZERO_GRADIENT):
            continue
        x, y = a[k].float(), b[k].float()
        off += int(((x - y).abs() > 2e-5 + 1e-4 * y.abs()).sum())
        total += x.numel()
        assert (x - y).abs().max() < 1e-3, k
    assert off <= 1e-5 * total, f"{off} of {total} weights differ"


def test_training_two_processes_equal_one(roots):
    base, paths = roots
    args = COMMON + paths + ["--ARCH_PATH=arch/mmnas_vqa.json"]
    run("train_vqa.py", args + ["--VERSION=one"], 1)
    out = run("train_vqa.py", args + ["--VERSION=two"], 2)
    folder = base / "logs" / "vqa" / "train"
    _assert_close(_weights(folder / "one" / "epoch1.pkl"), _weights(folder / "two" / "epoch1.pkl"))
    # rank 0 alone wrote: one log, whose evaluation counted every val question once
    log = (folder / "two" / "log.txt").read_text()
    assert "2 processes, gloo" in log and log.count("== run folder") == 1
    # evaluation gathered every rank's predictions: each val question counted once
    assert '"n_questions": 64' in (folder / "two" / "metrics.json").read_text()
    assert out.stdout.count("== run folder:") == 1 and out.stdout.count("\nrun folder:") == 1


def test_search_two_processes_equal_one(roots):
    base, paths = roots
    # 5 blocks, not 30: what is checked is the all-reduce of weights, gates and the loss
    args = COMMON + paths + ["--ARCH_START_EPOCH=0", "--ARCH_STEP_EVERY=1", "--ENC_BLOCKS=2",
                             "--DEC_BLOCKS=3"]
    run("search_vqa.py", args + ["--VERSION=one"], 1)
    run("search_vqa.py", args + ["--VERSION=two"], 2)
    folder = base / "logs" / "vqa" / "search"
    a, b = _weights(folder / "one" / "epoch1.pkl"), _weights(folder / "two" / "epoch1.pkl")
    assert any(k.endswith("alpha") and not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    _assert_close(a, b)
    assert (folder / "one" / "arch.json").read_text() == (folder / "two" / "arch.json").read_text()
