"""Checkpoint retention (CKPT_KEEP): the newest N, the best epoch of a training, and never
what a --RESUME needs: the newest intact checkpoint and the one it falls back to."""
import json

import pytest
import torch

from core.config import ConfigError, resolve
from core.run import main
from core.train import run_train
from core.tasks.vqa import VQATask
from runkit import build_data, train_flags
from utils.checkpoint import prune_checkpoints, save_checkpoint


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF            # inside the tensor data: fails the digest
    path.write_bytes(bytes(data))


def epochs_in(folder):
    return sorted(int(p.stem[5:]) for p in folder.glob("epoch*.pkl"))


@pytest.fixture
def five(tmp_path):
    """A folder with epoch1.pkl .. epoch5.pkl (tiny, with digests)."""
    for e in range(1, 6):
        save_checkpoint(tmp_path / f"epoch{e}.pkl", {"epoch": e, "state_dict": {
            "w": torch.full((64,), float(e))}})
    return tmp_path


def test_keeps_the_newest_n_and_the_best(five):
    deleted, damaged = prune_checkpoints(five, 5, keep=2, best=1)
    assert epochs_in(five) == [1, 4, 5] and deleted == ["epoch2.pkl", "epoch3.pkl"]
    assert damaged == []


def test_zero_keeps_everything(five):
    assert prune_checkpoints(five, 5, keep=0) == ([], [])
    assert epochs_in(five) == [1, 2, 3, 4, 5]


def test_a_damaged_newest_checkpoint_keeps_the_two_intact_ones_before_it(five):
    flip(five / "epoch5.pkl")
    deleted, damaged = prune_checkpoints(five, 5, keep=2)
    # epoch4 is what a resume takes, epoch3 its fallback; the damaged epoch5 stays too
    assert epochs_in(five) == [3, 4, 5] and damaged == ["epoch5.pkl"]
    assert deleted == ["epoch1.pkl", "epoch2.pkl"]


def test_later_epochs_than_the_one_written_are_left_alone(five):
    """A resume from epoch 2 rewrites epoch3..5 in turn; it never deletes them early."""
    prune_checkpoints(five, 2, keep=2)
    assert epochs_in(five) == [1, 2, 3, 4, 5]
    prune_checkpoints(five, 3, keep=2)
    assert epochs_in(five) == [2, 3, 4, 5]


def test_keep_one_is_refused():
    with pytest.raises(ConfigError, match="CKPT_KEEP = 1: expected 0 .keep all. or at least "
                                          "2 .the newest checkpoint and the one a --RESUME "
                                          "falls back to if it is damaged."):
        resolve("vqa", "train", {"CKPT_KEEP": 1})


def test_training_keeps_the_last_two_and_the_best_and_resumes_past_a_damaged_one(
        tmp_path_factory):
    base = tmp_path_factory.mktemp("retention")
    argv = build_data(base) + train_flags(base) + ["--VERSION=k", "--LR_BASE=0.001"]
    main(VQATask, "train", run_train, argv + ["--MAX_EPOCH=3"])
    folder = base / "logs" / "vqa" / "train" / "k"
    best = json.loads((folder / "metrics.json").read_text())["best"]["epoch"]
    assert epochs_in(folder) == sorted({2, 3, best})
    log = (folder / "log.txt").read_text()
    assert "removed epoch1.pkl" in log or best == 1
    # the newest is damaged: the resume takes the kept epoch2.pkl and trains epoch 3 again
    flip(folder / "epoch3.pkl")
    main(VQATask, "train", run_train, argv + ["--MAX_EPOCH=3", "--RESUME"])
    assert "warning: resuming from epoch2.pkl, the newest intact checkpoint (epoch3.pkl " \
           "damaged: not used)" in (folder / "log.txt").read_text()
    best = json.loads((folder / "metrics.json").read_text())["best"]["epoch"]
    assert epochs_in(folder) == sorted({2, 3, best})
    assert torch.load(folder / "epoch3.pkl", weights_only=True)["epoch"] == 3   # intact again
    records = [json.loads(line)["epoch"] for line in
               (folder / "records.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3]
