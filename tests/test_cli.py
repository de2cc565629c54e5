"""The command line: a --CONFIG file as a layer, --CKPT_V/--CKPT_E, --help per script."""
import pytest

from core.cli import command_line, usage
from core.config import ConfigError, resolve
from core.run import start
from core.tasks.vqa import VQATask

DATASETS = ("vqa", "demo")


def config_of(argv, kind="train"):
    return resolve("vqa", kind, command_line(argv, "vqa", kind, DATASETS))


# --------------------------------------------------------------------------- --CONFIG

def test_config_file_sits_between_the_task_yaml_and_the_flags(tmp_path):
    mine = tmp_path / "mine.yml"
    mine.write_text("HSIZE: 128\nBS: 16\nLR_BASE: 1e-4\ntrain:\n  MAX_EPOCH: 3\n"
                    "search:\n  MAX_EPOCH: 7\n")
    cfg = config_of([f"--CONFIG={mine}", "--HSIZE=96"])
    assert cfg.HSIZE == 96                       # flags beat the file
    assert cfg.MAX_EPOCH == 3                    # the file beats cfgs/vqa.yml (13)
    assert cfg.BATCH_SIZE == 16 and cfg.LR_BASE == pytest.approx(1e-4)   # original names too
    assert cfg.ANSWER_DICT == "core/data/vqa_answer_dict.json"          # cfgs/vqa.yml kept
    search = config_of([f"--CONFIG={mine}"], "search")
    assert search.MAX_EPOCH == 7 and search.HSIZE == 128


def test_config_file_selecting_the_demo_gets_the_demo_layer_under_it(tmp_path):
    mine = tmp_path / "mine.yml"
    mine.write_text("DATASET: demo\nMAX_REGIONS: 12\n")
    cfg = config_of([f"--CONFIG={mine}"])
    assert cfg.WORD_VECTORS == "hash" and cfg.HSIZE == 64 and cfg.MAX_REGIONS == 12


@pytest.mark.parametrize("text, words", [
    ("HSIZ: 128\n", ["mine.yml: unknown config key 'HSIZ'", "close matches: HSIZE"]),
    ("HSIZE: big\n", ["mine.yml: HSIZE = 'big' is not an int"]),
    ("DATASET: coco\n", ["mine.yml: DATASET = 'coco'; expected one of vqa, demo"]),
    ("- HSIZE\n", ["mine.yml: expected a mapping of KEY: value"]),
])
def test_bad_config_file_is_refused_naming_it(tmp_path, text, words):
    (tmp_path / "mine.yml").write_text(text)
    with pytest.raises(ConfigError) as e:
        config_of([f"--CONFIG={tmp_path / 'mine.yml'}"])
    for w in words:
        assert w in str(e.value)


def test_missing_config_file_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        start(VQATask, "train", [f"--LOG_ROOT={tmp_path}", f"--CONFIG={tmp_path}/no.yml"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --CONFIG={tmp_path}/no.yml: no such file")
    assert not (tmp_path / "vqa").exists()


def test_resume_refuses_a_config_file_that_changes_the_run(tmp_path, capsys):
    base = ["--DATASET=demo", f"--LOG_ROOT={tmp_path}", "--VERSION=v1"]
    start(VQATask, "train", [*base, "--BS=8"])
    mine = tmp_path / "mine.yml"
    mine.write_text("BATCH_SIZE: 16\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        start(VQATask, "train", [*base, "--RESUME", f"--CONFIG={mine}"])
    assert "BATCH_SIZE: saved 8, new 16" in capsys.readouterr().err
    mine.write_text("MAX_EPOCH: 20\n")                   # may change on a resume
    cfg, _, _ = start(VQATask, "train", [*base, "--RESUME", f"--CONFIG={mine}"])
    assert cfg.MAX_EPOCH == 20 and cfg.BATCH_SIZE == 8


# --------------------------------------------------------------------------- --CKPT_V

@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "vqa" / "train" / "t1"
    folder.mkdir(parents=True)
    for n in (1, 2, 10):
        (folder / f"epoch{n}.pkl").write_bytes(b"x")
    (folder / "last").write_text("epoch10.pkl\n")
    return tmp_path, folder


def test_ckpt_version_and_epoch_name_the_checkpoint(run_folder):
    root, folder = run_folder
    flags = [f"--LOG_ROOT={root}", "--RUN=val", "--CKPT_V=t1"]
    assert command_line([*flags, "--CKPT_E=2"], "vqa", "train", DATASETS)["CKPT_PATH"] == \
        str(folder / "epoch2.pkl")
    assert command_line(flags, "vqa", "train", DATASETS)["CKPT_PATH"] == \
        str(folder / "epoch10.pkl")                     # no --CKPT_E: the run's last
    search = root / "vqa" / "search" / "s1"
    search.mkdir(parents=True)
    (search / "epoch4.pkl").write_bytes(b"x")
    assert command_line([f"--LOG_ROOT={root}", "--CKPT_V=s1", "--CKPT_E=4"], "vqa",
                        "search", DATASETS)["CKPT_PATH"] == str(search / "epoch4.pkl")


@pytest.mark.parametrize("flags, words", [
    (["--CKPT_V=t1", "--CKPT_E=3"], ["--CKPT_V=t1 --CKPT_E=3: no checkpoint ", "epoch3.pkl",
                                     "holds epoch1.pkl, epoch2.pkl, epoch10.pkl"]),
    (["--CKPT_V=t9"], ["--CKPT_V=t9: no run folder ", "runs in ", ": t1)"]),
    (["--CKPT_E=2"], ["--CKPT_E=2 needs --CKPT_V"]),
    (["--CKPT_V=t1", "--CKPT_E=0"], ["--CKPT_E=0; expected an epoch number >= 1"]),
    (["--CKPT_V=t1", "--CKPT_PATH=x.pkl"], ["--CKPT_PATH=x.pkl and --CKPT_V/--CKPT_E both"]),
    (["--CKPT_V=../t1"], ["--CKPT_V='../t1'; expected a run's VERSION"]),
])
def test_bad_ckpt_version_is_one_line(run_folder, capsys, flags, words):
    root, _ = run_folder
    with pytest.raises(SystemExit) as e:
        start(VQATask, "train", [f"--LOG_ROOT={root}", "--RUN=val", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    for w in words:
        assert w in err


def test_ckpt_version_without_a_last_pointer(run_folder):
    root, folder = run_folder
    (folder / "last").unlink()
    with pytest.raises(ConfigError, match="has no checkpoint yet .*pass --CKPT_E=N"):
        command_line([f"--LOG_ROOT={root}", "--CKPT_V=t1"], "vqa", "train", DATASETS)


# --------------------------------------------------------------------------- --help

def help_lines(text: str) -> dict[str, str]:
    """``--KEY`` -> its first help line."""
    return {line.split()[0]: line for line in text.splitlines() if line.startswith("  --")}


def test_help_shows_the_values_of_each_script():
    search, train = (help_lines(usage(f"{k}_vqa.py", DATASETS)) for k in ("search", "train"))
    assert search["--HSIZE"].startswith("  --HSIZE 256 ") and "(default 512)" in search["--HSIZE"]
    assert search["--MAX_EPOCH"].startswith("  --MAX_EPOCH 100 ")
    assert train["--HSIZE"].startswith("  --HSIZE 512 ") and "(default" not in train["--HSIZE"]
    assert train["--LR_DECAY_EPOCHS"].startswith("  --LR_DECAY_EPOCHS [10,12] ")
    demo = help_lines(usage("train_vqa.py", DATASETS, ["--DATASET=demo", "--help"]))
    assert demo["--HSIZE"].startswith("  --HSIZE 64 ") and demo["--WORD_VECTORS"].startswith(
        "  --WORD_VECTORS hash ")
    vgd = help_lines(usage("train_vgd.py", ("refcoco", "refcoco+", "refcocog", "demo")))
    assert vgd["--LR_BASE"].startswith("  --LR_BASE 0.00014 ")
    assert vgd["--DATASET"].startswith("  --DATASET refcoco ")


def test_help_is_grouped_with_examples_at_the_end():
    text = usage("search_vqa.py", DATASETS)
    assert text.startswith("usage: python3 search_vqa.py [--DATASET={vqa,demo}]")  # no --RUN
    heads = [line for line in text.splitlines() if line and not line.startswith(" ")
             and line.endswith(":")]
    assert heads == ["command line only:", "run:", "data:", "model:", "optimisation:",
                     "search:", "examples:"]
    examples = text.split("examples:\n")[1].splitlines()
    assert 2 <= len(examples) <= 3 and all(e.startswith("  python3 search_vqa.py ")
                                           for e in examples)
    for flag in ("--CONFIG=FILE", "--CKPT_V=VERSION", "--CKPT_E=N"):
        assert f"  {flag} " in text
    train = usage("train_vqa.py", DATASETS)
    assert "search (search scripts only):" in train and "--RUN=val --CKPT_V=t1" in train


def test_bad_flags_with_help_still_show_the_script_values():
    text = usage("search_vqa.py", DATASETS, ["--HSIZ=3", "--help"])
    assert "flags ignored: command line: unknown flag --HSIZ" in text
    assert help_lines(text)["--HSIZE"].startswith("  --HSIZE 256 ")


def test_run_flag_is_still_refused_by_a_search(tmp_path, capsys):
    with pytest.raises(SystemExit):
        start(VQATask, "search", [f"--LOG_ROOT={tmp_path}", "--RUN=val"])
    assert "search_vqa.py only searches" in capsys.readouterr().err
