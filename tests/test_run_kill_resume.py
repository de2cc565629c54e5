"""SIGKILL a real search and a real training at every kind of point, resume: same files.

Each run folder is killed again and again (mid-epoch before any checkpoint, during a
checkpoint write, between a checkpoint and its arch.json/metrics.json, mid-epoch after a
checkpoint), resumed with --RESUME each time, and must end up with exactly the files of an
uninterrupted run: checkpoints tensor by tensor, arch.json, metrics.json, last.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from runkit import REPO, assert_same_run, build_data, search_flags, train_flags

# (kill point, what it leaves behind) of each run of a folder; the last run completes.
SEARCH_KILLS = ["step:2",    # mid-epoch 1: config.yaml and log.txt, no checkpoint
                "write:1",   # during epoch1.pkl's write: a half-written .tmp file
                "saved:1",   # epoch1.pkl complete; no `last`, no arch.json entry yet
                "step:2",    # mid-epoch 2, resumed from epoch1.pkl
                None]
TRAIN_KILLS = ["step:2",     # mid-epoch 1, no checkpoint
               "saved:1",    # epoch1.pkl complete; no `last`, no metrics.json yet
               "write:1",    # during epoch2.pkl's write
               None]


@pytest.fixture(scope="module")
def killed_and_straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    common = build_data(base)
    runs = {"search": ("search_vqa.py", common + search_flags(), SEARCH_KILLS),
            "train": ("train_vqa.py", common + train_flags(base), TRAIN_KILLS)}
    plan = []
    for script, argv, _ in runs.values():          # uninterrupted, then moved aside
        plan.append({"script": script, "argv": argv + ["--VERSION=r"]})
    plan.append({"move": [str(base / "logs"), str(base / "straight")]})
    for script, argv, kills in runs.values():
        for i, kill in enumerate(kills):
            resume = ["--RESUME"] if i else []     # the first run is an ordinary start
            plan.append({"script": script, "argv": argv + ["--VERSION=r"] + resume,
                         "kill": kill})
    (base / "plan.json").write_text(json.dumps(plan))
    out = subprocess.run([sys.executable, "tests/runkit.py", str(base / "plan.json"),
                          str(base / "codes.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return base, json.loads((base / "codes.json").read_text()), out


def test_every_run_but_the_last_of_a_folder_was_killed(killed_and_straight):
    _, codes, out = killed_and_straight
    expected = [0, 0] + [-9 if k else 0 for k in SEARCH_KILLS + TRAIN_KILLS]
    assert codes == expected, out.stderr[-3000:]


@pytest.mark.parametrize("kind", ["search", "train"])
def test_killed_and_resumed_run_has_the_uninterrupted_runs_files(killed_and_straight, kind):
    base, _, _ = killed_and_straight
    straight = base / "straight" / "vqa" / kind / "r"
    resumed = base / "logs" / "vqa" / kind / "r"
    assert_same_run(straight, resumed)
    names = {p.name for p in resumed.iterdir()}
    assert {"epoch1.pkl", "epoch2.pkl", "last", "config.yaml", "log.txt"} <= names
    assert ("arch.json" if kind == "search" else "metrics.json") in names
    output = json.loads((resumed / ("arch.json" if kind == "search" else "metrics.json"))
                        .read_text())
    if kind == "train":
        output = output["epochs"]
    assert len(output) == 2                      # both epochs, none lost to a kill
    if kind == "search":        # the architecture moved, so equal alphas mean something
        one, two = (torch.load(resumed / f"epoch{e}.pkl", weights_only=True)["state_dict"]
                    for e in (1, 2))
        alphas = [k for k in two if k.endswith("alpha")]
        assert alphas and any(not torch.equal(one[k], two[k]) for k in alphas)
    log = (resumed / "log.txt").read_text()
    assert f"{resumed} has no checkpoint yet: starting the run from scratch" in log
    assert "unfinished temporary file(s) of an interrupted write: .epoch" in log
