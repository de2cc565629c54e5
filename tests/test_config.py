"""Configuration: resolution order, the original's flags, error messages, the run folder."""
import pytest
import yaml

import core.config as config_mod
from core.cli import parse_args, usage
from core.config import KEYS, ConfigError, check_value, read_yaml, resolve
from core.run import start
from core.tasks.vqa import VQATask

DATASETS = ("vqa", "demo")


def _resolve_flags(argv, kind="train"):
    return resolve("vqa", kind, parse_args(argv, DATASETS))


# --------------------------------------------------------------------------- resolution order


def test_every_key_default_is_of_its_declared_type():
    for name, key in KEYS.items():
        if key.default is None:
            assert key.optional, name
        else:
            assert check_value(name, key.default, "defaults") == key.default


def test_train_section_of_vqa_yml_applies_to_train_runs():
    cfg = resolve("vqa", "train", {})
    assert cfg.HSIZE == 512
    assert cfg.MAX_EPOCH == 13
    assert cfg.LR_BASE == pytest.approx(1.2e-4)
    assert cfg.LR_DECAY_EPOCHS == [10, 12]
    # top level of vqa.yml
    assert cfg.ANSWER_DICT == "core/data/vqa_answer_dict.json"
    assert cfg.MAX_REGIONS == 100 and cfg.MAX_TOKEN == 14
    # not in any YAML: declared defaults
    assert cfg.DROPOUT_R == pytest.approx(0.1)
    assert cfg.DATA_ROOT == "datasets" and cfg.WORD_VECTORS == "glove:datasets/glove/glove.840B.300d.txt"
    assert cfg.TASK == "vqa" and cfg.RUN_MODE == "train"


def test_search_section_of_vqa_yml_applies_to_search_runs():
    cfg = resolve("vqa", "search", {})
    assert cfg.HSIZE == 256
    assert cfg.MAX_EPOCH == 100
    assert cfg.LR_BASE == pytest.approx(4.0e-4)
    assert cfg.LR_DECAY_EPOCHS == []
    assert cfg.ARCH_START_EPOCH == 20
    assert cfg.ANSWER_DICT == "core/data/vqa_answer_dict.json"


def test_demo_yml_only_with_dataset_demo():
    plain = resolve("vqa", "train", {"DATASET": "vqa"})
    assert plain.DATA_ROOT == "datasets" and plain.HSIZE == 512 and plain.NUM_WORKERS == 2
    demo = resolve("vqa", "train", {"DATASET": "demo"})
    assert demo.DATA_ROOT == "datasets/demo"
    assert demo.WORD_VECTORS == "hash"
    assert demo.ANSWER_DICT == ""          # demo top level beats vqa.yml top level
    assert demo.MAX_REGIONS == 16 and demo.NUM_WORKERS == 0
    assert demo.HSIZE == 64                # demo top level beats vqa.yml's train section
    assert demo.FLAT_MLP_SIZE == 64 and demo.REL_SIZE == 16
    assert demo.MAX_EPOCH == 8 and demo.LR_DECAY_EPOCHS == [6]
    assert demo.LR_BASE == pytest.approx(3.0e-4) and demo.LR_WARMUP_EPOCHS == 1


def test_demo_search_layers_on_vqa_search_section():
    cfg = resolve("vqa", "search", {"DATASET": "demo"})
    assert cfg.HSIZE == 64
    assert cfg.MAX_EPOCH == 4                # demo search section
    assert cfg.ARCH_START_EPOCH == 1         # demo search beats vqa.yml search (20)
    assert cfg.ARCH_STEP_EVERY == 2
    assert cfg.LR_DECAY_EPOCHS == []         # from vqa.yml search; demo search doesn't set it
    assert cfg.MAX_REGIONS == 16


@pytest.mark.parametrize("kind", ["train", "search"])
def test_command_line_beats_every_yaml(kind):
    cfg = _resolve_flags(["--DATASET=demo", "--HSIZE=128", "--MAX_EPOCH=2",
                          "--DATA_ROOT=/data/x", "--LR_DECAY_EPOCHS=[1]"], kind)
    assert cfg.HSIZE == 128 and cfg.MAX_EPOCH == 2 and cfg.DATA_ROOT == "/data/x"
    assert cfg.LR_DECAY_EPOCHS == [1]
    assert cfg.FLAT_MLP_SIZE == 64           # untouched demo value


def test_resolve_does_not_share_mutable_defaults():
    a = resolve("vqa", "search", {})
    a.OPT_BETAS.append(0.5)
    a.ENC_CANDIDATES.append("x")
    b = resolve("vqa", "search", {})
    assert b.OPT_BETAS == [0.9, 0.98]
    assert b.ENC_CANDIDATES == ["self_att_64", "feed_forward"]
    assert KEYS["OPT_BETAS"].default == [0.9, 0.98]


def test_int_given_for_float_key_becomes_float():
    cfg = resolve("vqa", "train", {"LR_BASE": 1, "OPT_BETAS": [0, 0]})   # betas < 1
    assert isinstance(cfg.LR_BASE, float) and cfg.LR_BASE == 1.0
    assert cfg.OPT_BETAS == [0.0, 0.0] and all(isinstance(b, float) for b in cfg.OPT_BETAS)


def test_frozen_config_cannot_change_and_setting_checks_type():
    cfg = resolve("vqa", "train", {})
    cfg.HSIZE = 32
    assert cfg.HSIZE == 32
    with pytest.raises(ConfigError, match="HSIZE"):
        cfg.HSIZE = "big"
    cfg.freeze()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.HSIZE = 64
    with pytest.raises(AttributeError, match="HSIZ"):
        cfg.HSIZ


# --------------------------------------------------------------------------- flags


def test_parse_args_original_flags():
    out = parse_args(["--RUN", "val", "--BS=8", "--NW", "0", "--SPLIT=train+val",
                      "--GENO_EPOCH=3", "--RESUME", "--VERSION=2024",
                      "--LR_DECAY_EPOCHS=[1,2]"], DATASETS)
    assert out == {"RUN_MODE": "val", "BATCH_SIZE": 8, "NUM_WORKERS": 0,
                   "TRAIN_SPLIT": "train+val", "ARCH_EPOCH": 3, "RESUME": True,
                   "VERSION": "2024", "LR_DECAY_EPOCHS": [1, 2]}
    assert isinstance(out["VERSION"], str) and isinstance(out["BATCH_SIZE"], int)


def test_parse_args_flag_forms():
    assert parse_args(["--RESUME"], DATASETS) == {"RESUME": True}          # bare, last
    assert parse_args(["--RESUME", "false"], DATASETS) == {"RESUME": False}
    assert parse_args(["--ARCH_EPOCH", "5"], DATASETS) == {"ARCH_EPOCH": 5}
    out = parse_args(["--GPU=0", "--SEED=null", "--TRAIN_SPLIT=yes", "--VERSION=1.5"],
                     DATASETS)
    assert out == {"GPU": "0", "SEED": None, "TRAIN_SPLIT": "yes", "VERSION": "1.5"}
    cfg = _resolve_flags(["--SEED=null", "--GPU", "0,1", "--OPT_BETAS=[0.8, 0.9]"])
    assert cfg.SEED is None and cfg.GPU == "0,1" and cfg.OPT_BETAS == [0.8, 0.9]


def test_resolved_flags_reach_the_config():
    cfg = _resolve_flags(["--RUN", "val", "--BS=8", "--NW", "0", "--SPLIT=train+val",
                          "--GENO_EPOCH=3", "--RESUME"])
    assert (cfg.RUN_MODE, cfg.BATCH_SIZE, cfg.NUM_WORKERS, cfg.TRAIN_SPLIT, cfg.ARCH_EPOCH,
            cfg.RESUME) == ("val", 8, 0, "train+val", 3, True)
    assert cfg.eval_batch_size() == 8
    assert _resolve_flags(["--BS=8", "--EVAL_BATCH_SIZE=100"]).eval_batch_size() == 100


def test_float_flag_in_exponent_notation():
    cfg = _resolve_flags(["--LR_BASE=1e-4", "--OPT_EPS=1e-9"])
    assert cfg.LR_BASE == pytest.approx(1e-4) and cfg.OPT_EPS == pytest.approx(1e-9)


def test_unknown_flag_names_it_and_suggests_the_key():
    with pytest.raises(ConfigError) as e:
        parse_args(["--HSIZ=3"], DATASETS)
    msg = str(e.value)
    assert "--HSIZ" in msg and "HSIZE" in msg and "unknown" in msg


def test_argument_without_dashes_is_rejected():
    with pytest.raises(ConfigError, match="unexpected argument 'HSIZE=3'"):
        parse_args(["HSIZE=3"], DATASETS)


def test_flag_without_value_at_the_end():
    with pytest.raises(ConfigError, match="--HSIZE needs a value"):
        parse_args(["--HSIZE"], DATASETS)


@pytest.mark.parametrize("flag, key, expected", [
    ("--MAX_EPOCH=two", "MAX_EPOCH", "int"),
    ("--HSIZE=1.5", "HSIZE", "int"),
    ("--RESUME=1", "RESUME", "bool"),
    ("--LR_DECAY_EPOCHS=3", "LR_DECAY_EPOCHS", "list[int]"),
    ("--LR_DECAY_EPOCHS=[1,x]", "LR_DECAY_EPOCHS", "list[int]"),
    ("--DROPOUT_R=high", "DROPOUT_R", "float"),
    ("--HSIZE=null", "HSIZE", "int"),
])
def test_wrong_type_names_key_and_expected_type(flag, key, expected):
    with pytest.raises(ConfigError) as e:
        _resolve_flags([flag])
    msg = str(e.value)
    assert msg.startswith("command line:")
    assert f"{key} = " in msg and f"is not {'an' if expected == 'int' else 'a'} {expected}" in msg


def test_run_and_dataset_choices():
    with pytest.raises(ConfigError) as e:
        parse_args(["--RUN=foo"], DATASETS)
    assert "'foo'" in str(e.value) and "train, val, test" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_args(["--DATASET=coco"], DATASETS)
    assert "'coco'" in str(e.value) and "vqa, demo" in str(e.value)


def test_usage_lists_every_key():
    text = usage("train_vqa.py", DATASETS)
    assert text.startswith("usage: python3 train_vqa.py [--RUN={train,val,test}] "
                           "[--DATASET={vqa,demo}]")
    for name in KEYS:
        assert f"--{name} " in text


# --------------------------------------------------------------------------- YAML files


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    """Point the config layer at ``tmp_path/cfgs`` (messages name files relative to REPO)."""
    folder = tmp_path / "cfgs"
    folder.mkdir()
    monkeypatch.setattr(config_mod, "CFG_DIR", folder)
    monkeypatch.setattr(config_mod, "REPO", tmp_path)
    return folder


def test_read_yaml_merges_top_level_and_section(tmp_path):
    path = tmp_path / "x.yml"
    path.write_text("HSIZE: 1\nMAX_EPOCH: 2\ntrain:\n  HSIZE: 3\nsearch:\n  HSIZE: 4\n")
    assert read_yaml(path, "train") == {"HSIZE": 3, "MAX_EPOCH": 2}
    assert read_yaml(path, "search") == {"HSIZE": 4, "MAX_EPOCH": 2}
    path.write_text("")
    assert read_yaml(path, "train") == {}


def test_unknown_key_in_yaml_names_the_file(cfg_dir):
    (cfg_dir / "vqa.yml").write_text("HSIZE: 8\ntrain:\n  HSIZ: 3\n")
    assert resolve("vqa", "search", {}).HSIZE == 8     # the train section is not read
    with pytest.raises(ConfigError) as e:
        resolve("vqa", "train", {})
    msg = str(e.value)
    assert msg.startswith("cfgs/vqa.yml:") and "'HSIZ'" in msg and "HSIZE" in msg


def test_wrong_type_in_demo_yaml_names_the_file(cfg_dir):
    (cfg_dir / "vqa.yml").write_text("HSIZE: 8\n")
    (cfg_dir / "vqa_demo.yml").write_text("search:\n  MAX_EPOCH: four\n")
    assert resolve("vqa", "search", {}).HSIZE == 8      # demo file not applied
    with pytest.raises(ConfigError) as e:
        resolve("vqa", "search", {"DATASET": "demo"})
    assert str(e.value).startswith("cfgs/vqa_demo.yml: MAX_EPOCH = 'four' is not an int")


def test_unknown_key_via_read_yaml_and_check_value(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("search:\n  ARCH_LRR: 0.1\n")
    values = read_yaml(path, "search")
    with pytest.raises(ConfigError) as e:
        for k, v in values.items():
            check_value(k, v, str(path))
    assert str(path) in str(e.value) and "ARCH_LR" in str(e.value)


def test_malformed_yaml_files(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("HSIZE: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yml: not valid YAML"):
        read_yaml(path, "train")
    path.write_text("- HSIZE\n- 3\n")
    with pytest.raises(ConfigError, match="bad.yml: expected a mapping"):
        read_yaml(path, "train")
    path.write_text("train:\n  - HSIZE\n")
    with pytest.raises(ConfigError, match="bad.yml: section 'train' must be a mapping"):
        read_yaml(path, "train")


def test_missing_yaml_files_leave_the_defaults(cfg_dir):
    cfg = resolve("vqa", "train", {"DATASET": "demo"})
    assert cfg.HSIZE == KEYS["HSIZE"].default and cfg.DATA_ROOT == "datasets"


# --------------------------------------------------------------------------- run folder


def _start(tmp_path, *extra):
    return start(VQATask, "train", ["--DATASET=demo", f"--LOG_ROOT={tmp_path}",
                                    "--VERSION=v1", *extra])


def test_start_writes_resolved_config_and_log(tmp_path, capsys):
    cfg, run, task = _start(tmp_path)
    folder = tmp_path / "vqa" / "train" / "v1"
    assert run.folder == folder and folder.is_dir()
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved == cfg.to_dict()
    assert saved["HSIZE"] == 64 and saved["DATASET"] == "demo" and saved["VERSION"] == "v1"
    assert saved["LOG_ROOT"] == str(tmp_path) and saved["TASK"] == "vqa"
    assert isinstance(saved["SEED"], int)                 # drawn and recorded
    assert set(saved) == set(KEYS)
    log = (folder / "log.txt").read_text().splitlines()
    assert log[0] == f"== train_vqa.py --DATASET=demo --LOG_ROOT={tmp_path} --VERSION=v1"
    assert log[1] == f"== run folder: {folder}"
    assert log[2] == "== config:"
    assert yaml.safe_load("\n".join(log[3:3 + len(KEYS)])) == saved
    assert isinstance(task, VQATask) and task.cfg is cfg
    with pytest.raises(AttributeError, match="frozen"):
        cfg.HSIZE = 1
    run.log("hello")
    assert (folder / "log.txt").read_text().endswith("hello\n")


def test_second_start_same_version_exits_and_keeps_the_first(tmp_path, capsys):
    _start(tmp_path, "--SEED=7")
    folder = tmp_path / "vqa" / "train" / "v1"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _start(tmp_path, "--SEED=8")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder ") and str(folder) in err
    assert "already exists" in err and "--RESUME" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_resume_keeps_the_saved_config_under_new_flags(tmp_path, capsys):
    cfg1, run1, _ = _start(tmp_path, "--MAX_EPOCH=3", "--BS=8")
    saved = (run1.folder / "config.yaml").read_bytes()
    cfg2, run2, _ = _start(tmp_path, "--RESUME", "--NW=1")   # NUM_WORKERS may change
    assert cfg2.SEED == cfg1.SEED                        # drawn seed reused
    assert cfg2.MAX_EPOCH == 3 and cfg2.BATCH_SIZE == 8 and cfg2.RESUME is True
    assert cfg2.NUM_WORKERS == 1
    # written by the runner once the checkpoint has loaded, not by start()
    assert (run2.folder / "config.yaml").read_bytes() == saved
    assert (run2.folder / "log.txt").read_text().count("== config:") == 2   # appended


def test_start_rejects_bad_flags_with_one_line(tmp_path, capsys):
    for argv, words in ([["--HSIZ=3"], ["unknown flag --HSIZ", "HSIZE"]],
                        [["--RUN=foo"], ["--RUN='foo'", "train, val, test"]],
                        [["--HSIZE=1.5"], ["HSIZE = 1.5", "int"]]):
        with pytest.raises(SystemExit) as e:
            start(VQATask, "train", [f"--LOG_ROOT={tmp_path}", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        for w in words:
            assert w in err
    assert not (tmp_path / "vqa").exists()


def test_help_prints_usage_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        start(VQATask, "search", ["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python3 search_vqa.py")


def test_val_run_folder_and_timestamp_version(tmp_path, capsys):
    cfg, run, _ = start(VQATask, "train", ["--DATASET=demo", f"--LOG_ROOT={tmp_path}",
                                           "--RUN=val"])
    assert run.folder.parent == tmp_path / "vqa" / "val"
    assert cfg.VERSION.startswith("demo-") and run.folder.name == cfg.VERSION
    cfg2, run2, _ = start(VQATask, "train", ["--DATASET=demo", f"--LOG_ROOT={tmp_path}",
                                             "--RUN=val"])
    assert run2.folder != run.folder                    # never the same folder twice
