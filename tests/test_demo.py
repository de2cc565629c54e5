"""demo/__main__.py and demo/build.py: ``python3 -m demo`` builds the three tasks' demo data;
their statistics are the tasks' own baselines on the written files."""
import json
import re

import pytest

import demo.__main__ as demo_main
from core.tasks.vqa import majority_baseline
from demo import itm, vgd, vqa

TINY = {vqa: {"train": 3, "val": 2, "test": 1, "vg": 1, "min_questions": 3, "max_questions": 3},
        vgd: {"train": 2, "val": 1, "testA": 1, "testB": 1},
        itm: {"train": 2, "dev": 1, "test": 2}}
MARKERS = {"vqa": "vqa", "vgd": "vgd/demo", "itm": "itm"}


@pytest.fixture
def tiny(monkeypatch):
    for module, sizes in TINY.items():
        monkeypatch.setattr(module, "DEFAULT_SIZES", sizes)


def stats_printed(out: str) -> dict:
    """{task: its printed statistics} of ``python3 -m demo``'s output."""
    found = re.findall(r"^(\w+):\n(\{.*?^\})\nelapsed_s: \d+\.\d\d$", out, re.S | re.M)
    return {name: json.loads(text) for name, text in found}


def test_demo_builds_every_task_and_prints_their_statistics(tiny, tmp_path, capsys):
    demo_main.main(["--root", str(tmp_path), "--seed", "2"])
    stats = stats_printed(capsys.readouterr().out)
    assert list(stats) == ["vqa", "vgd", "itm"]
    for name, folder in MARKERS.items():
        marker = json.loads((tmp_path / folder / ".demo_complete").read_text())
        assert marker["seed"] == 2 and marker["stats"] == stats[name]
    assert stats["vgd"]["images"] == TINY[vgd]
    assert stats["itm"]["chance_r1_t2i"] == 50.0 and stats["itm"]["chance_r1_i2t"] == 50.0


def test_demo_of_one_task_and_force_rebuilds_only_it(tiny, tmp_path, capsys):
    demo_main.main(["--root", str(tmp_path), "--task", "vgd"])
    assert list(stats_printed(capsys.readouterr().out)) == ["vgd"]
    assert not (tmp_path / "vqa").exists() and not (tmp_path / "itm").exists()
    marker = tmp_path / "vgd" / "demo" / ".demo_complete"
    split = tmp_path / "vgd" / "demo" / "val.json"
    split.write_text("[]")                       # a built demo is not rebuilt ...
    demo_main.main(["--root", str(tmp_path), "--task", "vgd"])
    assert split.read_text() == "[]"
    demo_main.main(["--root", str(tmp_path), "--task", "vgd", "--force"])   # ... unless forced
    assert json.loads(split.read_text()) and marker.is_file()


def test_unknown_task_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        demo_main.main(["--task", "gqa"])
    assert stop.value.code == 2
    assert "--task: invalid choice: 'gqa' (choose from" in capsys.readouterr().err


def test_vqa_majority_baseline_is_the_tasks_on_the_written_files(tiny, tmp_path):
    stats = vqa.build_vqa_demo(tmp_path, seed=4)
    folder = tmp_path / "vqa"
    train, val = (json.loads((folder / f"v2_mscoco_{s}2014_annotations.json").read_text())
                  ["annotations"] for s in ("train", "val"))
    answer, accuracy = majority_baseline(train, val)
    assert stats["majority_answer"] == answer
    assert stats["majority_baseline_acc_val"] == round(accuracy, 2)


def test_majority_baseline_by_hand():
    def ann(mc, answers):
        return {"multiple_choice_answer": mc, "answers": [{"answer": a} for a in answers]}

    # "no" and "yes" tie twice each: the first alphabetically wins, whatever the order
    train = [ann("yes", []), ann("no", []), ann("yes", []), ann("no", [])]
    assert majority_baseline(train, []) == ("no", 0.0)
    assert majority_baseline(train[::-1], [ann("no", ["no"] * 10)]) == ("no", 100.0)
