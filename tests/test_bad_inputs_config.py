"""Bad settings stop at start-up with one line naming the key, the value and what was
expected, and write nothing; a --RESUME keeps the run it continues (issue 10, points 2-3)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from core.tasks.vgd.refer import main as preprocess_vgd
from core.run import main, start
from core.search import run_search
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from core.tasks.vqa import VQATask
from core.train import run_train
from test_tasks_vgd_refer import REAL as REFCOCOG, edit_refs

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


# --------------------------------------------------------------------------- --RESUME


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


# --------------------------------------------------------------------------- preprocess_vgd.py


def test_refs_file_with_an_empty_split_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("instances.json", "refs(umd).p"):
        shutil.copyfile(REFCOCOG / name, raw / name)
    edit_refs(raw, lambda refs: [r.update(split="train") for r in refs if r["split"] == "val"])
    out = tmp_path / "out"
    assert preprocess_vgd(["--dataset", "refcocog", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{raw / 'refs(umd).p'}: no ref in split 'val'" in err
    assert "expected refs in every split of refcocog" in err
    assert "train 10, val 0, test 5" in err
    assert not out.exists()                             # no split file written
