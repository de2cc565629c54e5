"""infer_vqa.py: one question about one image, answered by a trained (tiny demo) model."""
import json
import re

import pytest

import infer_vqa
from core.run import start
from core.tasks.vqa import VQATask
from core.train import run_train
from tinyvqa import train_tiny, val_question


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("infer")
    flags, ckpt = train_tiny(base)
    return base, flags, ckpt


def answers_printed(out: str) -> list[tuple[str, float]]:
    return [(m[1], float(m[2])) for m in re.finditer(r"^  \d\. (\S+)\s+([\d.]+)$", out, re.M)]


def test_top_answers_agree_with_the_evaluation_of_the_checkpoint(trained, capsys):
    base, flags, ckpt = trained
    # what --RUN=val answers for the first val question (the checkpoint named the MCAN way,
    # by the run's version and epoch) ...
    cfg, run, task = start(VQATask, "train", [*flags, "--RUN=val", "--CKPT_V=tiny",
                                              "--CKPT_E=1", "--VERSION=val"])
    assert cfg.CKPT_PATH == str(ckpt)
    run_train(cfg, task, run)
    question, features = val_question(base / "data")
    predicted = {p["question_id"]: p["answer"] for p in
                 json.loads((run.folder / "result_val_tiny_epoch1.json").read_text())}
    capsys.readouterr()
    # ... is the top answer of the single-sample command, run on its feature file alone
    infer_vqa.main([f"--CKPT_PATH={ckpt}", f"--FEATURES={features}",
                    f"--QUESTION={question['question']}"])
    out = capsys.readouterr().out
    answers = answers_printed(out)
    assert len(answers) == 5 and f"question: {question['question']}" in out
    assert answers[0][0] == predicted[question["question_id"]]
    scores = [s for _, s in answers]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert len({a for a, _ in answers}) == 5


def test_unknown_words_are_named_and_top_is_honoured(trained, capsys):
    base, _, ckpt = trained
    _, features = val_question(base / "data")
    infer_vqa.main([f"--CKPT_PATH={ckpt}", f"--FEATURES={features}", "--TOP=2",
                    "--QUESTION=What colour is the zeppelin?"])
    out = capsys.readouterr().out
    assert "not in the vocabulary (read as UNK): colour, zeppelin" in out
    assert len(answers_printed(out)) == 2


@pytest.mark.parametrize("change, words", [
    ({"--FEATURES": "{base}/missing.npz"}, ["--FEATURES=", "missing.npz: no such file"]),
    ({"--QUESTION": "?!"}, ["--QUESTION='?!': no words in it"]),
    ({"--CKPT_PATH": "{base}/none.pkl"}, ["checkpoint", "none.pkl does not exist"]),
    ({"--TOP": "0"}, ["--TOP=0: expected a number of answers >= 1"]),
])
def test_bad_input_is_one_line(trained, capsys, change, words):
    base, _, ckpt = trained
    _, features = val_question(base / "data")
    args = {"--CKPT_PATH": str(ckpt), "--FEATURES": str(features), "--QUESTION": "is it red?"}
    args.update({k: v.format(base=base) for k, v in change.items()})
    with pytest.raises(SystemExit) as e:
        infer_vqa.main([f"{k}={v}" for k, v in args.items()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_a_search_checkpoint_is_refused(tmp_path, capsys):
    from utils.checkpoint import save_checkpoint
    path = tmp_path / "search.pkl"
    save_checkpoint(path, {"kind": "search", "task": "vqa", "state_dict": {}})
    with pytest.raises(SystemExit):
        infer_vqa.main([f"--CKPT_PATH={path}", f"--FEATURES={path}", "--QUESTION=why"])
    assert "a vqa search checkpoint; infer_vqa.py needs a VQA training checkpoint" in \
        capsys.readouterr().err
