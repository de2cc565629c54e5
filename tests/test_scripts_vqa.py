"""End to end on the demo data: search, resume, train, val, test — through the scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.run import start
from core.pictures import PictureError, draw_attention
from core.search import run_search
from core.tasks.vqa import VQATask
from core.train import run_train
from visualize import TASKS

REPO = Path(__file__).resolve().parents[1]
# tiny runs: few samples, small batches, architecture steps from the first epoch
QUICK = ["--DATASET=demo", "--SUBSET=96", "--BS=16", "--NW=0", "--SEED=7"]
# the runs whose checks count no samples take a third of them (a later flag wins)
FEWER = ["--SUBSET=32"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, demo_data):
    base = tmp_path_factory.mktemp("e2e")
    return [f"--DATA_ROOT={demo_data}", f"--LOG_ROOT={base / 'logs'}"], base


def search(args):
    cfg, run, task = start(VQATask, "search", args)
    run_search(cfg, task, run)
    return run.folder


def train(args):
    cfg, run, task = start(VQATask, "train", args)
    return run_train(cfg, task, run), run.folder


def test_search_script_writes_architecture_checkpoint_and_log(roots):
    paths, base = roots
    out = subprocess.run([sys.executable, "search_vqa.py", *QUICK, *FEWER, *paths,
                          "--MAX_EPOCH=1", "--ARCH_START_EPOCH=0", "--VERSION=script"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    folder = base / "logs" / "vqa" / "search" / "script"
    arch = json.loads((folder / "arch.json").read_text())
    assert list(arch) == ["epoch1"] and len(arch["epoch1"]["dec"]) == 18
    log = (folder / "log.txt").read_text()
    assert "dec 17: SA" in log and "arg-max sub-network on the architecture split" in log
    assert (folder / "epoch1.pkl").exists() and (folder / "last").read_text().strip() == \
        "epoch1.pkl"
    assert "HSIZE: 64" in (folder / "config.yaml").read_text()
    # the search drew itself: the pictures hold the checkpoint's softmax(alpha)
    pics = folder / "pictures"
    assert {"alphas_epoch1.png", "alpha_trajectories.png", "arch_epoch1.png", "curves.png"} \
        <= {p.name for p in pics.iterdir()}
    history = json.loads((pics / "history.json").read_text())
    state = torch.load(folder / "epoch1.pkl", weights_only=True)["state_dict"]
    assert history[0]["alphas"]["dec"][17] == pytest.approx(
        torch.softmax(state["backbone.dec_list.17.alpha"], -1).tolist())
    with pytest.raises(PictureError, match="a search checkpoint; the attention map needs a "
                                           "training checkpoint"):
        draw_attention(folder / "epoch1.pkl", "1", base / "no.png", TASKS)
    # the search's architecture file trains directly (original flag name --GENO_EPOCH)
    metrics, _ = train(QUICK + FEWER + paths + [f"--ARCH_PATH={folder / 'arch.json'}",
                                        "--GENO_EPOCH=1", "--MAX_EPOCH=1",
                                        "--VERSION=from-search"])
    assert "overall" in metrics


def test_train_val_test_and_resume(roots):
    paths, base = roots
    common = QUICK + FEWER + paths + ["--ARCH_PATH=arch/mmnas_vqa.json"]
    metrics, folder = train(common + ["--MAX_EPOCH=1", "--VERSION=t"])   # val of the last epoch
    assert 0.0 <= metrics["overall"] <= 100.0 and set(metrics["perAnswerType"]) == \
        {"yes/no", "number", "other"}
    history = json.loads((folder / "metrics.json").read_text())["epochs"]
    assert history[0]["epoch"] == 1
    assert "baseline on val: majority_answer" in (folder / "log.txt").read_text()

    # --RESUME continues after epoch 1 to epoch 2
    train(common + ["--MAX_EPOCH=2", "--VERSION=t", "--RESUME"])
    assert torch.load(folder / "epoch2.pkl", weights_only=True)["epoch"] == 2
    # the training drew its curves: the numbers of metrics.json, one point per epoch
    curves = json.loads((folder / "pictures" / "history.json").read_text())
    assert [(r["epoch"], r["val overall"]) for r in curves] == [
        (r["epoch"], pytest.approx(r["val"]["overall"])) for r in
        json.loads((folder / "metrics.json").read_text())["epochs"]]
    assert (folder / "pictures" / "curves.png").stat().st_size > 1000

    # --RUN=val on the checkpoint gives the logged accuracy of that epoch
    ckpt = f"--CKPT_PATH={folder / 'epoch2.pkl'}"
    val, val_folder = train(QUICK + FEWER + paths + ["--RUN=val", ckpt, "--VERSION=v"])
    logged = json.loads((folder / "metrics.json").read_text())["epochs"][-1]["val"]["overall"]
    assert val["val"]["overall"] == pytest.approx(logged)
    assert json.loads((val_folder / "metrics_val.json").read_text()) == val
    assert val_folder == base / "logs" / "vqa" / "val" / "v"

    # the attention map of that checkpoint answers what --RUN=val answered
    answer = json.loads((val_folder / "result_val_t_epoch2.json").read_text())[0]
    drawn = draw_attention(folder / "epoch2.pkl", str(answer["question_id"]),
                           base / "attention.png", TASKS, log=lambda _: None)
    assert drawn["lines"][2].split()[0] == answer["answer"] and len(drawn["lines"]) >= 7
    assert drawn["regions"].sum() == pytest.approx(1.0) and drawn["background"] == "blank"
    assert sum(a for _, a in drawn["words"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(PictureError, match="--sample=7: no question_id 7 in split 'val'"):
        draw_attention(folder / "epoch2.pkl", "7", base / "no.png", TASKS, log=lambda _: None)

    # --RUN=test writes the EvalAI upload file: every test question, one string answer
    _, test_folder = train(QUICK + paths + ["--RUN=test", ckpt, "--VERSION=u"])
    result = json.loads((test_folder / "result_test_t_epoch2.json").read_text())
    data = paths[0].split("=", 1)[1]
    questions = json.loads((Path(data) / "vqa" /
                            "v2_OpenEnded_mscoco_test2015_questions.json").read_text())
    assert [r["question_id"] for r in result] == \
        [q["question_id"] for q in questions["questions"][:96]]
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str)
               for r in result)



def test_checkpoint_with_reordered_vocabulary_is_refused(roots, capsys):
    """Same size, two words swapped: the shapes fit, so only the recorded words can tell.
    (A checkpoint whose words equal the data's loads: test_train_val_test_and_resume.)"""
    from core.arch import load_arch
    from core.run import ensure_data, main
    from core.loop import build_net
    from core.model import fixed_backbone
    from utils.checkpoint import save_checkpoint
    paths, base = roots
    args = QUICK + paths + ["--RUN=val", "--ARCH_PATH=arch/mmnas_vqa.json"]
    cfg, run, task = start(VQATask, "train", args + ["--VERSION=vocab-made"])
    ensure_data(cfg, task, run.log)
    task.prepare()
    net = build_net(cfg, task, fixed_backbone(cfg, load_arch(cfg.ARCH_PATH, 0, cfg.ENC_BLOCKS,
                                                             cfg.DEC_BLOCKS)))
    meta = task.model_meta()
    words = meta["vocab"]
    assert words[:3] == ["PAD", "UNK", "CLS"] and len(words) == meta["vocab_size"]
    assert len(meta["answers"]) == meta["answer_size"]
    first, second = words[3], words[4]
    words[3], words[4] = second, first
    path = base / "reordered.pkl"
    save_checkpoint(path, {"kind": "train", "meta": meta, "state_dict": net.state_dict()})
    with pytest.raises(SystemExit):
        main(VQATask, "train", run_train, args + ["--VERSION=vocab-refused",
                                                  f"--CKPT_PATH={path}"])
    assert (f"error: {path}: its word vocabulary differs from the data's at index 3: "
            f"checkpoint {second!r}, data {first!r}") in capsys.readouterr().err


def test_train_script_unknown_flag_exits_2_with_one_error_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_vqa.py", "--DATASET=demo", "--HSIZ=3",
                           f"--LOG_ROOT={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")
    assert "--HSIZ" in proc.stderr and "HSIZE" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not any(tmp_path.iterdir())               # no run folder made


def test_train_script_missing_arch_file_exits_2_with_one_error_line(vqa_val_root):
    root, _ = vqa_val_root
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_vqa.py", f"--DATA_ROOT={root}",
                           "--WORD_VECTORS=hash", f"--LOG_ROOT={root / 'logs'}",
                           f"--ARCH_PATH={root / 'nope.json'}", "--VERSION=a"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert f"architecture file {root / 'nope.json'} does not exist" in proc.stderr
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
