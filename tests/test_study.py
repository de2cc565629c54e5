"""tools/study.py --quick: every arm of a search study, end to end, on a tiny VQA tree."""
import json

import pytest
import torch

from core import pictures
from core.arch import Arch
from core.config import resolve
from core.model import prior_arch
from tests.runkit import DATA_SIZES
from tools import study, study_arms

FLAGS = ["--DATASET=vqa", "--WORD_VECTORS=hash", "--ANSWER_DICT=", "--ANS_MIN_COUNT=1",
         "--MAX_REGIONS=8", "--NW=0"]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from demo.vqa import build_vqa_demo
    base = tmp_path_factory.mktemp("study")
    build_vqa_demo(base / "data", seed=0, sizes=DATA_SIZES)
    # Each of the 18 runs would draw its own curves (the slowest part of a tiny run);
    # tests/test_scripts.py checks those pictures, this test checks the study's.
    # One thread: at these sizes a second one only waits (and on a loaded machine, spins).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pictures, "train_epoch", lambda *args: None)
        patch.setattr(pictures, "search_epoch", lambda *args: None)
        result = study.main(["--task", "vqa", "--quick", "--VERSION=q",
                             f"--LOG_ROOT={base / 'logs'}", f"--DATA_ROOT={base / 'data'}",
                             *FLAGS])
    torch.set_num_threads(threads)
    return result, base / "logs" / "vqa" / "study" / "q"


def test_quick_study_trains_every_arm_with_every_seed(quick_study):
    result, folder = quick_study
    names = [a["name"] for a in result["arms"]]
    assert names[:4] == ["search-prior", "search-uniform", "paper", "mcan"]
    assert names[4].startswith("random search (random")
    assert result["seeds"] == [0, 1] and len(result["random"]) == 2
    for arm in result["arms"] + result["random"]:
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        assert all(0.0 <= s <= 100.0 for s in arm["scores"])
        assert arm["params"] > 0 and arm["ms_per_sample"] > 0
    # the uniform search started from equal alphas: its config has no prior
    config = (folder / "runs" / "vqa" / "search" / "search-uniform" / "config.yaml").read_text()
    assert "ENC_PRIOR: []" in config and "DEC_PRIOR: []" in config
    # both searches and random search report what finding their architecture cost
    assert all(a["cost_cpu_s"] > 0 for a in result["arms"] if a["kind"] != "paper"
               and a["kind"] != "mcan")


def test_random_search_picks_on_the_architecture_split_never_val(quick_study):
    result, folder = quick_study
    pick = next(a for a in result["arms"] if a["kind"] == "random search")
    on_arch_split = [a["score_arch_split"] for a in result["random"]]
    assert pick["score_arch_split"] == max(on_arch_split)
    select = folder / "runs" / "vqa" / "train" / "random1-select"
    assert "searcharch" in json.loads((select / "metrics.json").read_text())["epochs"][0]
    random_archs = json.loads((folder / "random_archs.json").read_text())
    assert len(random_archs) == 2 and len(random_archs["epoch1"]["dec"]) == 18


def test_quick_study_writes_table_json_and_chart(quick_study):
    result, folder = quick_study
    table = (folder / "table.md").read_text()
    assert table.startswith("| vqa arm | overall mean ± std (2 seeds) |")
    assert "| random (mean of 2) |" in table and "std of the random architectures" in table
    saved = json.loads((folder / "study.json").read_text())
    assert saved["verdict"].keys() == {"search-prior", "search-uniform"}
    assert saved["arms"][2]["mean"] == pytest.approx(sum(saved["arms"][2]["scores"]) / 2)
    assert (folder / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_reuses_finished_runs(quick_study, tmp_path):
    result, folder = quick_study
    base = folder.parents[3]
    again = study.main(["--task", "vqa", "--quick", "--VERSION=q", f"--LOG_ROOT={base / 'logs'}",
                        f"--DATA_ROOT={base / 'data'}", *FLAGS])
    assert [a["scores"] for a in again["arms"]] == [a["scores"] for a in result["arms"]]


def _arm(name, kind, scores):
    return {"name": name, "kind": kind, **study_arms.summary(scores)}


def test_separation_says_whether_the_data_makes_the_architecture_matter():
    arms = [_arm("search-prior", "search", [51.0, 53.0]), _arm("paper", "paper", [49.0, 49.5]),
            _arm("random search (random1)", "random search", [60.0, 60.0])]
    randoms = [_arm("random1", "random", [50.0, 51.0])]
    sep = study_arms.separation(arms, randoms)
    # the random-search row repeats random1: it is not counted a second time
    assert (sep["best"], sep["worst"]) == ("search-prior", "paper")
    assert sep["gap"] == pytest.approx(52.0 - 49.25)
    pooled = ((2.0 + 0.125 + 0.5) / 3) ** 0.5       # mean of the three seed variances
    assert sep["seed_std"] == pytest.approx(pooled)
    assert sep["separates"] is True                  # 2.75 > 2 x 0.935
    close = study_arms.separation([_arm("paper", "paper", [49.0, 52.0])],
                                  [_arm("random1", "random", [50.0, 51.0])])
    assert close["separates"] is False               # 0.0 gap vs a 1.6 spread


def test_quick_study_table_says_whether_the_architecture_matters(quick_study):
    result, folder = quick_study
    table = (folder / "table.md").read_text()
    sep = result["separation"]
    assert f"best ({sep['best']}) - worst ({sep['worst']}) = {sep['gap']:.2f}, " in table
    # the quick study's tiny runs may land either way; the sentence must say which
    verdict = ("the architecture matters on this data (more than 2x)" if sep["separates"] else
               "the architecture does not clearly matter on this data (2x or less)")
    assert verdict in table


def test_table_names_the_operators_each_architecture_is_made_of():
    arch = {"enc": [["self_att_64"], ["feed_forward"], ["feed_forward"]],
            "dec": [["guided_att_64"], ["rel_self_att_64"], ["guided_att_64"]]}
    assert study_arms.operator_counts(arch) == "encoder 2 FFN 1 SA; decoder 2 GA 1 RSA"


def test_quick_study_table_lists_the_searched_architectures(quick_study):
    result, folder = quick_study
    table = (folder / "table.md").read_text()
    assert "\nsearch-prior: encoder " in table and "\nmcan: encoder 6 FFN 6 SA; decoder " in table


def test_searched_arms_say_how_far_they_moved_from_their_prior():
    cfg = resolve("vqa", "search", {})
    prior = prior_arch(cfg)
    assert prior.enc[:3] == ("self_att_64", "feed_forward", "self_att_64")
    assert prior.dec[:4] == ("rel_self_att_64", "guided_att_64", "feed_forward", "rel_self_att_64")
    moved = Arch(("feed_forward",) + prior.enc[1:], prior.dec[:-1] + ("guided_att_64",))
    assert study_arms.blocks_off(prior, moved) == 2
    assert prior_arch(resolve("vqa", "search", {"ENC_PRIOR": [], "DEC_PRIOR": []})) is None


def test_quick_study_reports_blocks_off_the_prior(quick_study):
    result, folder = quick_study
    prior_arm, uniform_arm = result["arms"][:2]
    assert 0 <= prior_arm["off_prior"] <= 30 and uniform_arm["off_prior"] is None
    assert "blocks off the prior it started from)" in (folder / "table.md").read_text()


@pytest.mark.parametrize("task", sorted(study.TASKS))
def test_full_study_flags_are_valid_settings_of_both_kinds(task):
    """The full study's per-task schedule (not run in the suite) resolves for search and
    training; ITM's is the one the README's table was measured with."""
    args, flags = study.parse(["--task", task, "--DATASET=demo"])
    plan = study.plan_of(args, flags)
    search, train = study_arms.resolved(plan, "search"), study_arms.resolved(plan, "train")
    assert search.DATASET == train.DATASET == "demo" and len(plan.seeds) == 3
    if task == "itm":
        assert (train.MAX_EPOCH, train.BATCH_SIZE, train.ITM_HARD_NEG_EPOCH) == (1, 32, 99)
        assert (search.MAX_EPOCH, search.ARCH_START_EPOCH, search.ARCH_EVAL_SAMPLES) == (2, 1, 250)
