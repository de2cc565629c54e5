"""Starting and resuming a run (core/run.py). A bad setting stops at start-up with one line
naming the key, the value and what was expected, and writes nothing; a --RESUME keeps the run it
continues. A damaged checkpoint, a run folder in use, an unwritable or full disk: one clear
message, exit status 2 (or a logged fallback), and the files already written stay as they were."""
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from core.records import metrics_file
from core.run import Run, main, start
from core.search import run_search
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from core.tasks.vqa import VQATask
from core.train import run_train
from runkit import _assert_same, build_data, files_of, train_flags
from utils.io import atomic_write_json, atomic_write_text


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


def test_bf16_on_a_cpu_without_bfloat16_is_one_line_and_no_folder(finished, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr("core.run.cpu_has_bf16", lambda: False)
    argv = [a for a in finished[1] if not a.startswith("--LOG_ROOT=")]
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv + [f"--LOG_ROOT={tmp_path}", "--AMP=bf16"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: AMP = 'bf16', but this CPU (") and \
        err[-1].endswith("has no bfloat16 support in oneDNN (it needs AVX512-BF16 or AMX); "
                         "use --AMP=off")
    assert not (tmp_path / "vqa" / "train" / "r").exists()


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


SCRIPTS = {"vqa": VQATask, "vgd": VGDTask, "itm": ITMTask}


def refused(capsys, script: str, argv: list[str], runner=None) -> str:
    """Run ``script`` ('search_vqa', ...) on ``argv`` in-process; it must exit 2 with one
    'error:' line. ``runner`` given: the script body goes on to it (errors found there)."""
    kind, task = script.split("_")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        if runner is None:
            start(SCRIPTS[task], kind, argv)
        else:
            main(SCRIPTS[task], kind, runner, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- one key, one value
# (script, flags, words of the message): the key and the value as given, and what is valid.
BAD_STARTS = [
    ("search_vqa", ["--ARCH_MODE=fulll"], ["ARCH_MODE = 'fulll' is not one of 'full', 'two'"]),
    ("train_vqa", ["--AMP=bf61"], ["AMP = 'bf61' is not one of 'off', 'bf16', 'fp16'"]),
    ("search_vqa", ["--RUN=val"], ["RUN_MODE = 'val'", "search_vqa.py only searches",
                                   "expected 'train'", "train_vqa.py --RUN=val"]),
    ("train_vqa", ["--SUBSET=-5"], ["SUBSET = -5 is not an int >= 0"]),
    ("train_vqa", ["--BS=0"], ["BATCH_SIZE = 0 is not an int >= 1", "(flag --BS)"]),
    ("train_vgd", ["--BS=-4"], ["BATCH_SIZE = -4 is not an int >= 1"]),
    ("search_vqa", ["--MAX_EPOCH=0"], ["MAX_EPOCH = 0 is not an int >= 1"]),
    ("search_itm", ["--ARCH_STEP_EVERY=0"], ["ARCH_STEP_EVERY = 0 is not an int >= 1"]),
    ("search_vgd", ["--ARCH_SPLIT_RATIO=1"],
     ["ARCH_SPLIT_RATIO = 1 is not a float > 0.0 and < 1.0"]),
    ("train_vqa", ["--DROPOUT_R=1.0"], ["DROPOUT_R = 1.0 is not a float >= 0.0 and < 1.0"]),
    ("train_itm", ["--LR_BASE=0"], ["LR_BASE = 0 is not a float > 0.0"]),
    ("train_vqa", ["--OPT_BETAS=[0.9]"],
     ["OPT_BETAS = [0.9] is not a list of 2 items, each a float >= 0.0 and < 1.0"]),
    ("search_vqa", ["--ARCH_BETAS=[0.0,1.5]"],
     ["ARCH_BETAS = [0.0, 1.5]: 1.5 is not a float >= 0.0 and < 1.0"]),
    ("train_vqa", ["--LR_DECAY_EPOCHS=[10,-2]"],
     ["LR_DECAY_EPOCHS = [10, -2]: -2 is not an int >= 0"]),
    ("search_vqa", ["--DEC_CANDIDATES=[self_att_64,guided_att_65]"],
     ["DEC_CANDIDATES = ['self_att_64', 'guided_att_65']: 'guided_att_65' is not one of",
      "'guided_att_64'"]),
    ("search_vqa", ["--DEC_PRIOR=[rel_self_att_64,self_att_16]"],
     ["DEC_PRIOR = ['rel_self_att_64', 'self_att_16']: 'self_att_16' is not in "
      "DEC_CANDIDATES", "expected prior ops among the candidates"]),
    ("train_itm", ["--ITM_NEG_CANDIDATES=4"],
     ["ITM_NEG_TOPK = 5 is more than ITM_NEG_CANDIDATES = 4"]),
    ("train_vgd", ["--WORD_VECTORS=glove"],
     ["WORD_VECTORS = 'glove' is not 'spacy:<model>', 'glove:<path>' or 'hash'"]),
    ("train_vqa", ["--GPU=cuda:0"], ["GPU = 'cuda:0' is not GPU ids separated by commas"]),
    ("train_vqa", ["--VERSION=../elsewhere"],
     ["VERSION = '../elsewhere' is not a folder name without '/'"]),
    ("train_vqa", ["--TRAIN_SPLIT=train++val"],
     ["TRAIN_SPLIT = 'train++val' is not split names joined by '+'"]),
    ("train_vqa", ["--SEED=-1"], ["SEED = -1 is not an int >= 0 and <= 4294967295"]),
    ("train_vqa", ["--TASK=vgd"], ["TASK = 'vgd', but train_vqa.py runs 'vqa'"]),
    ("search_vgd", ["--ARCH_PATH=arch/mcan.json"],
     ["ARCH_PATH = 'arch/mcan.json': search_vgd.py does not read it", "expected empty"]),
]


@pytest.mark.parametrize("script, flags, words", BAD_STARTS,
                         ids=[f"{s}-{f[0]}" for s, f, _ in BAD_STARTS])
def test_bad_value_refused_before_anything_is_written(tmp_path, capsys, script, flags, words):
    err = refused(capsys, script, ["--DATASET=demo", f"--LOG_ROOT={tmp_path / 'logs'}",
                                   f"--DATA_ROOT={tmp_path / 'data'}", *flags])
    for w in words:
        assert w in err
    assert not any(tmp_path.iterdir())              # no run folder, no data built


@pytest.fixture
def saved_run(tmp_path, capsys):
    """A started demo training run 'r' (config.yaml and log, no checkpoint yet)."""
    common = ["--DATASET=demo", f"--LOG_ROOT={tmp_path}", f"--DATA_ROOT={tmp_path / 'data'}",
              "--VERSION=r"]
    start(VQATask, "train", common + ["--SEED=3"])
    return common, tmp_path / "vqa" / "train" / "r"


RESUME_CHANGES = [
    (["--BS=4"], ["BATCH_SIZE: saved 64, new 4"]),
    (["--LR_BASE=1e-3"], ["LR_BASE: saved 0.0003, new 0.001"]),
    (["--SEED=4"], ["SEED: saved 3, new 4"]),
    (["--HSIZE=32", "--ARCH_MODE=two"], ["HSIZE: saved 64, new 32",
                                         "ARCH_MODE: saved 'full', new 'two'"]),
    (["--MAX_EPOCH=9", "--AMP=bf16"], ["AMP: saved 'off', new 'bf16'"]),
]


@pytest.mark.parametrize("flags, words", RESUME_CHANGES, ids=[f[0] for f, _ in RESUME_CHANGES])
def test_resume_refuses_a_change_of_the_run(saved_run, capsys, flags, words):
    common, folder = saved_run
    before = folder_bytes(folder)
    err = refused(capsys, "train_vqa", common + ["--RESUME", *flags])
    assert f"--RESUME of {folder} would change the run: " in err
    for w in words:
        assert w in err
    assert "MAX_EPOCH:" not in err                      # may change: not reported
    assert "a resume may change only " in err and "MAX_EPOCH" in err
    assert folder_bytes(folder) == before               # config.yaml and log untouched


@pytest.mark.parametrize("flags, words", [
    (["--VERSION=other"], ["--RESUME: run folder ", "other does not exist"]),
    (["--VERSION="], ["--RESUME needs the --VERSION of the run to continue"]),
    (["--BS=0"], ["BATCH_SIZE = 0 is not an int >= 1"]),
])
def test_resume_of_no_run_or_with_a_bad_value(saved_run, capsys, flags, words):
    common, folder = saved_run
    before = folder_bytes(folder.parent)
    err = refused(capsys, "train_vqa", common + ["--RESUME", *flags])
    for w in words:
        assert w in err
    assert folder_bytes(folder.parent) == before        # nothing made, nothing changed


def test_resume_of_a_folder_without_config_yaml(saved_run, capsys):
    common, folder = saved_run
    (folder / "config.yaml").unlink()
    (folder / "epoch1.pkl").write_bytes(b"a checkpoint of a config nobody knows")
    before = folder_bytes(folder)
    err = refused(capsys, "train_vqa", common + ["--RESUME"])
    assert f"--RESUME: {folder / 'config.yaml'} does not exist" in err
    assert folder_bytes(folder) == before


def test_resume_of_a_folder_killed_before_it_wrote_anything_starts_it(saved_run):
    common, folder = saved_run
    (folder / "config.yaml").unlink()
    cfg, run, _ = start(VQATask, "train", common + ["--SEED=5", "--RESUME"])
    assert cfg.SEED == 5 and cfg.RESUME and run.folder == folder    # the runner saves it


def test_failed_resume_keeps_the_config(vqa_val_root, capsys):
    root, _ = vqa_val_root
    common = [f"--DATA_ROOT={root}", f"--LOG_ROOT={root / 'logs'}", "--WORD_VECTORS=hash",
              "--VERSION=r", "--ARCH_PATH=arch/mcan.json"]
    start(VQATask, "train", common + ["--SEED=3"])
    folder = root / "logs" / "vqa" / "train" / "r"
    (folder / "epoch1.pkl").write_bytes(b"")            # the only checkpoint, damaged
    saved = (folder / "config.yaml").read_bytes()
    err = refused(capsys, "train_vqa", common + ["--RESUME", "--MAX_EPOCH=20"],
                  runner=run_train)
    assert "epoch1.pkl" in err
    assert (root / "logs" / "vqa" / "train" / "r" / "config.yaml").read_bytes() == saved


def test_resume_with_a_larger_max_epoch_continues_and_records_it(vqa_val_root, capsys):
    root, _ = vqa_val_root
    tiny = [f"--DATA_ROOT={root}", f"--LOG_ROOT={root / 'logs'}", "--WORD_VECTORS=hash",
            "--TRAIN_SPLIT=val", "--SUBSET=20", "--BS=8", "--NW=0", "--SEED=2",
            "--HSIZE=64", "--FLAT_MLP_SIZE=32", "--REL_SIZE=8", "--MAX_REGIONS=12",
            "--MAX_TOKEN=6", "--WORD_EMBED_SIZE=16",
            "--ENC_BLOCKS=1", "--DEC_BLOCKS=1", "--ARCH_START_EPOCH=0", "--VERSION=s"]
    cfg, run, task = start(VQATask, "search", tiny + ["--MAX_EPOCH=1"])
    run_search(cfg, task, run)
    first = yaml.safe_load((run.folder / "config.yaml").read_text())
    cfg, run, task = start(VQATask, "search", tiny + ["--MAX_EPOCH=2", "--RESUME"])
    run_search(cfg, task, run)
    saved = yaml.safe_load((run.folder / "config.yaml").read_text())
    assert saved["MAX_EPOCH"] == 2 and saved["RESUME"] is False     # a setting of the command, not the run
    assert {k: v for k, v in saved.items() if k not in ("MAX_EPOCH", "RESUME")} == \
        {k: v for k, v in first.items() if k not in ("MAX_EPOCH", "RESUME")}
    assert torch.load(run.folder / "epoch2.pkl", weights_only=True)["epoch"] == 2
    assert list(json.loads((run.folder / "arch.json").read_text())) == ["epoch1", "epoch2"]
    assert f"resumed from {run.folder / 'epoch1.pkl'}: epoch 1" in \
        (run.folder / "log.txt").read_text()
