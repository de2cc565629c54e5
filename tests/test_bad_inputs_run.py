"""A damaged checkpoint, a run folder in use, an unwritable or full disk: one clear message,
exit status 2 (or a logged fallback), and the files already written stay as they were."""
import errno
import json
import os
import shutil
import signal

import pytest
import torch

from core.records import metrics_file
from core.run import Run, main
from core.tasks.vqa import VQATask
from core.train import run_train
from runkit import _assert_same, build_data, files_of, train_flags
from utils.checkpoint import save_checkpoint
from utils.io import atomic_write_json, atomic_write_text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: a second thread only spins (and costs 10x the CPU on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """A finished 2-epoch training run; returns (its folder, the flags that made it)."""
    base = tmp_path_factory.mktemp("done")
    argv = build_data(base) + train_flags(base) + ["--VERSION=r"]
    main(VQATask, "train", run_train, argv)
    return base / "logs" / "vqa" / "train" / "r", argv


def copy_run(finished, tmp_path):
    """A copy of the finished run under ``tmp_path/logs``, and the flags to resume it."""
    folder, argv = finished
    copy = tmp_path / "logs" / "vqa" / "train" / "r"
    shutil.copytree(folder, copy)
    argv = [a for a in argv if not a.startswith("--LOG_ROOT=")]
    return copy, argv + [f"--LOG_ROOT={tmp_path / 'logs'}", "--RESUME"]


def learned(ckpt_path):
    """What a checkpoint learned (not its config, which names its folder)."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    return {k: ckpt[k] for k in ("epoch", "step", "state_dict", "net_optim", "rng", "outputs")}


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF            # inside the tensor data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (truncate, "cannot be read as a PyTorch checkpoint, truncated or damaged?"),
    (empty, "empty file (0 bytes"),
    (flip, "damaged: its contents do not match the sha256 digest stored in it"),
])
def test_damaged_last_checkpoint_falls_back_to_the_one_before(finished, tmp_path, damage, why):
    copy, argv = copy_run(finished, tmp_path)
    epoch1 = (copy / "epoch1.pkl").read_bytes()
    damage(copy / "epoch2.pkl")
    main(VQATask, "train", run_train, argv)             # returns: no exit status 2
    log = (copy / "log.txt").read_text()
    assert f"warning: {copy / 'epoch2.pkl'}: {why}" in log
    assert "warning: resuming from epoch1.pkl, the newest intact checkpoint (epoch2.pkl " \
           "damaged: not used)" in log
    assert (copy / "epoch1.pkl").read_bytes() == epoch1
    # epoch 2 is trained again, exactly as the first time
    _assert_same(learned(copy / "epoch2.pkl"), learned(finished[0] / "epoch2.pkl"), "epoch2")
    assert (copy / "metrics.json").read_bytes() == (finished[0] / "metrics.json").read_bytes()
    assert (copy / "last").read_text() == "epoch2.pkl\n"


def test_no_intact_checkpoint_left_is_an_error(finished, tmp_path, capsys):
    copy, argv = copy_run(finished, tmp_path)
    empty(copy / "epoch2.pkl")
    flip(copy / "epoch1.pkl")
    before = files_of(copy)
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {copy}: no intact checkpoint to resume from (epoch2.pkl, epoch1.pkl damaged, " \
        f"see above); move them away to start the run from scratch"
    after = files_of(copy)
    for name in ("epoch1.pkl", "epoch2.pkl", "last", "metrics.json"):
        assert after[name] == before[name], name


def test_damaged_checkpoint_given_explicitly_is_an_error(finished, tmp_path, capsys):
    bad = tmp_path / "epoch2.pkl"
    shutil.copyfile(finished[0] / "epoch2.pkl", bad)
    flip(bad)
    before = bad.read_bytes()
    argv = [a for a in finished[1] if not a.startswith(("--LOG_ROOT=", "--VERSION="))]
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv + [f"--LOG_ROOT={tmp_path / 'logs'}",
                                                  "--RUN=val", f"--CKPT_PATH={bad}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {bad}: damaged: its contents do not match the sha256 digest stored in it"
    assert bad.read_bytes() == before


def test_second_run_of_a_folder_in_use_is_refused(finished, tmp_path, capsys):
    copy, argv = copy_run(finished, tmp_path)
    before = files_of(copy)
    ready_r, ready_w = os.pipe()
    holder = os.fork()
    if holder == 0:                        # another process resuming the same folder
        try:
            Run(copy, resume=True)
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    try:
        os.read(ready_r, 1)
        with pytest.raises(SystemExit) as e:
            main(VQATask, "train", run_train, argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"error: run folder {copy} is in use by another run (process {holder} on " \
            f"{os.uname().nodename}); two runs of one folder would overwrite each other's " \
            f"files: wait for it to end or stop it"
        after = files_of(copy)
        assert {k: v for k, v in after.items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    Run(copy, resume=True)                 # a killed holder leaves no stuck lock


def _mkdir_denied(self, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(self))


@pytest.mark.parametrize("case", ["under a regular file", "permission denied"])
def test_run_folder_that_cannot_be_created(finished, tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "logs"
    blocker.write_text("a file, not a folder")
    if case == "permission denied":
        blocker = tmp_path / "ro"
        monkeypatch.setattr("pathlib.Path.mkdir", _mkdir_denied)
    argv = [a for a in finished[1] if not a.startswith("--LOG_ROOT=")]
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv + [f"--LOG_ROOT={blocker}"])
    assert e.value.code == 2
    folder = blocker / "vqa" / "train" / "r"
    reason = {"under a regular file": f"Not a directory ({blocker} is a file)",
              "permission denied": "Permission denied"}[case]
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: cannot create the run folder {folder}: {reason}; check --LOG_ROOT"
    assert (tmp_path / "logs").read_text() == "a file, not a folder"


def test_full_disk_during_a_checkpoint_is_a_logged_error(finished, tmp_path, capsys,
                                                          monkeypatch):
    copy, argv = copy_run(finished, tmp_path)
    # as a run killed after epoch 1 left it
    (copy / "epoch2.pkl").unlink()
    atomic_write_text(copy / "last", "epoch1.pkl\n")
    atomic_write_json(copy / "metrics.json", metrics_file(
        json.loads((copy / "metrics.json").read_text())["epochs"][:1]))
    before = files_of(copy)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv)
    assert e.value.code == 2
    message = f"cannot write {copy / 'epoch2.pkl'}: No space left on device ("
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert f"error: {message}" in (copy / "log.txt").read_text()
    after = files_of(copy)
    for name in ("epoch1.pkl", "last", "metrics.json"):
        assert after[name] == before[name], name
    assert not [n for n in after if n.endswith(".tmp")] and "epoch2.pkl" not in after


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        save_checkpoint(tmp_path / "epoch1.pkl", {"state_dict": {"w": torch.ones(2)}})
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == mode
    assert (tmp_path / "epoch1.pkl").stat().st_mode & 0o777 == mode
