"""What a run leaves behind: records.jsonl, the arg-max stability count, metrics.json's best
epoch, result files named after their checkpoint, --THREADS, TENSORBOARD, and no folder
for a run that fails before its work starts."""
import json
import sys

import pytest
import torch

from core.records import (argmax_of, argmax_step, main_metric, metrics_file,
                          stability_line)
from core.run import main
from core.search import run_search
from core.tasks.vqa import VQATask
from core.train import run_train
from runkit import build_data, search_flags, train_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("records")
    return base, build_data(base)


def records_of(folder):
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


# --- arg-max stability -------------------------------------------------------------------------
def table(enc, dec):
    """Block probabilities as a search records them, from the index of each block's max."""
    def block(names, i):
        return {n: (0.7 if j == i else 0.3 / (len(names) - 1)) for j, n in enumerate(names)}
    return {"enc": [block(("SA", "FFN"), i) for i in enc],
            "dec": [block(("SA", "RSA", "GA", "FFN"), i) for i in dec]}


def test_stability_count_on_a_hand_made_alpha_history():
    # the prior, then 7 epochs; architecture steps from epoch 2 on (ARCH_START_EPOCH = 1)
    history = [table([0, 1], [1, 2, 3]),      # start (the prior's arg-max)
               table([0, 1], [1, 2, 3]),      # epoch 1: no architecture step
               table([1, 1], [1, 2, 0]),      # epoch 2: enc 0 and dec 2 changed
               table([1, 1], [1, 2, 0]),      # epoch 3: none changed -> stable 1
               table([1, 1], [1, 2, 0]),      # epoch 4: stable 2
               table([1, 1], [2, 2, 0]),      # epoch 5: dec 0 changed -> 0
               table([1, 1], [2, 2, 0]),      # epoch 6: stable 1
               table([1, 1], [2, 2, 0])]      # epoch 7: stable 2
    stable, seen = 0, []
    for epoch in range(1, len(history)):
        changed, stable = argmax_step(argmax_of(history[epoch - 1]), argmax_of(history[epoch]),
                                      stable, searched=epoch - 1 >= 1)
        seen.append((changed, stable))
    assert seen == [(0, 0), (2, 0), (0, 1), (0, 2), (1, 0), (0, 1), (0, 2)]
    assert argmax_of(history[5]) == {"enc": ["FFN", "FFN"], "dec": ["GA", "GA", "SA"]}
    assert stability_line(7, 0, 2, 5, True) == \
        "epoch 7: arg-max stable: no block changed for 2 epochs"
    assert stability_line(5, 1, 0, 5, True) == "epoch 5: arg-max: 1 of 5 blocks changed since " \
                                               "epoch 4"


def test_metrics_json_names_the_earliest_best_epoch():
    history = [{"epoch": e, "val": {"overall": v, "n_questions": 96}, "testA": {"overall": 99}}
               for e, v in ((1, 10.0), (2, 30.0), (3, 30.0), (4, 20.0))]
    assert metrics_file(history) == {"best": {"epoch": 2, "split": "val", "metric": "overall",
                                              "value": 30.0}, "epochs": history}
    assert main_metric({"acc": 71.0, "n": 64}) == "acc"                      # grounding
    assert main_metric({"i2t": {"r1": 1.0}, "t2i": {"r1": 2.0}, "rsum": 3.0}) == "rsum"
    assert metrics_file([{"epoch": 1, "test": {}}])["best"] is None          # no labels


# --- a search and a training leave their records ------------------------------------------------
def test_search_records_every_epoch_and_says_when_the_argmax_is_stable(data):
    base, common = data
    main(VQATask, "search", run_search, common + search_flags() + ["--VERSION=s",
                                                                   "--MAX_EPOCH=1"])
    folder = base / "logs" / "vqa" / "search" / "s"
    first = records_of(folder)
    assert [r["epoch"] for r in first] == [1]
    assert {"loss", "lr", "samples_per_s", "epoch_seconds", "finished_at", "arch_split",
            "argmax_changed", "argmax_stable_epochs", "alphas"} <= set(first[0])
    assert first[0]["samples_per_s"] > 0 and "overall" in first[0]["arch_split"]
    # a resume goes on: one line per epoch, the stability count carried over
    main(VQATask, "search", run_search, common + search_flags() + [
        "--VERSION=s", "--MAX_EPOCH=2", "--RESUME"])
    lines = records_of(folder)
    assert [r["epoch"] for r in lines] == [1, 2] and lines[0] == first[0]
    # the probabilities are the checkpoint's softmax(alpha), block by block
    state = torch.load(folder / "epoch2.pkl", weights_only=True)["state_dict"]
    dec1 = torch.softmax(state["backbone.dec_list.1.alpha"], -1).tolist()
    assert list(lines[1]["alphas"]["dec"][1].values()) == pytest.approx(dec1)
    # the count follows the arg-max of arch.json from epoch to epoch
    arch = json.loads((folder / "arch.json").read_text())
    changed = sum(a != b for s in ("enc", "dec")
                  for a, b in zip(arch["epoch1"][s], arch["epoch2"][s]))
    stable = lines[1]["argmax_stable_epochs"]
    assert lines[1]["argmax_changed"] == changed
    assert stable == (0 if changed else lines[0]["argmax_stable_epochs"] + 1)
    log = (folder / "log.txt").read_text()
    assert (f"epoch 2: arg-max stable: no block changed for {stable} epoch" in log) == (stable > 0)
    assert (f"epoch 2: arg-max: {changed} of 3 blocks changed since epoch 1" in log) == \
        (changed > 0)
    assert f"the arg-max has not changed for {stable} epoch(s)" in log


def test_test_run_reuses_the_checkpoints_sizes_and_names_its_result_after_it(data, capsys):
    base, common = data
    main(VQATask, "train", run_train, common + train_flags(base) + ["--VERSION=t1",
                                                                    "--MAX_EPOCH=1"])
    folder = base / "logs" / "vqa" / "train" / "t1"
    assert [r["epoch"] for r in records_of(folder)] == [1]
    assert json.loads((folder / "metrics.json").read_text())["best"]["epoch"] == 1
    # no size flag: HSIZE 64, one encoder and two decoder blocks come from the checkpoint
    where = [a for a in common if a.startswith(("--DATA_ROOT", "--LOG_ROOT"))]
    main(VQATask, "train", run_train, where + [
        "--RUN=test", f"--CKPT_PATH={folder / 'epoch1.pkl'}", "--VERSION=u", "--NW=0"])
    out = base / "logs" / "vqa" / "test" / "u"
    assert (out / "result_test_t1_epoch1.json").is_file()
    log = (out / "log.txt").read_text()
    assert "from the checkpoint's config" in log and "HSIZE 64" in log and "DEC_BLOCKS 2" in log
    assert "HSIZE: 64" in (out / "config.yaml").read_text()


# --- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing data", "missing checkpoint", "missing arch file"])
def test_a_run_failing_before_its_work_leaves_no_folder_and_one_error(data, tmp_path, capsys,
                                                                       case):
    base, common = data
    argv = [a for a in common if not a.startswith("--LOG_ROOT")] + [
        f"--LOG_ROOT={tmp_path}", "--VERSION=f"] + train_flags(base)
    argv += {"missing data": [f"--DATA_ROOT={tmp_path / 'nothing'}"],
             "missing checkpoint": [f"--CKPT_PATH={tmp_path / 'no.pkl'}"],
             "missing arch file": [f"--ARCH_PATH={tmp_path / 'no.json'}"]}[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(VQATask, "train", run_train, argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("error:") == 1 and "error:" not in out
    assert not (tmp_path / "vqa" / "train" / "f").exists()
    if case == "missing checkpoint":
        assert err.strip() == f"error: checkpoint {tmp_path / 'no.pkl'} does not exist " \
                              f"(--CKPT_PATH)"


def test_tensorboard_asked_for_but_missing_is_one_line(data, tmp_path, capsys, monkeypatch):
    base, common = data
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # import fails
    argv = [a for a in common if not a.startswith("--LOG_ROOT")] + [
        f"--LOG_ROOT={tmp_path}", "--VERSION=tb", "--TENSORBOARD=true"] + train_flags(base)
    with pytest.raises(SystemExit):
        main(VQATask, "train", run_train, argv)
    assert capsys.readouterr().err == (
        "error: TENSORBOARD = true, but the tensorboard package is not installed (pip install "
        "tensorboard); records.jsonl holds the same numbers\n")
    assert not (tmp_path / "vqa").exists()


def test_threads_flag_sets_and_logs_the_thread_count(data, tmp_path):
    from core.run import start
    base, common = data
    argv = [a for a in common if not a.startswith("--LOG_ROOT")] + [
        f"--LOG_ROOT={tmp_path}", "--VERSION=th", "--THREADS=2"] + train_flags(base)
    torch.set_num_threads(1)
    try:
        _, run, _ = start(VQATask, "train", argv)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    log = (run.folder / "log.txt").read_text()
    assert "threads: 2 of " in log
    # KEEP_FREED_MEMORY (on by default) says what it did to this process's malloc
    assert "memory: glibc malloc keeps freed memory" in log or "memory: system allocator" in log


def test_keep_freed_memory_off_is_accepted_and_not_logged(data, tmp_path):
    from core.run import start
    base, common = data
    argv = [a for a in common if not a.startswith("--LOG_ROOT")] + [
        f"--LOG_ROOT={tmp_path}", "--VERSION=km", "--KEEP_FREED_MEMORY=false"] + train_flags(base)
    _, run, _ = start(VQATask, "train", argv)
    assert "memory:" not in (run.folder / "log.txt").read_text()
