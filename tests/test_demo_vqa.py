"""Tests for the embedded synthetic VQA demo (demo/scenes.py, demo/vqa.py)."""

import json
import re

import numpy as np
import pytest

from demo import scenes as sc
from demo import vqa
from core.tasks.vqa import majority_baseline
from core.tasks.vqa.evaluation import normalize_result_answer, question_accuracy
from demokit import assert_same_files

TINY = {"train": 14, "val": 6, "test": 4, "vg": 5, "min_questions": 6, "max_questions": 8}
QUESTION_FILES = {
    "train": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test": "v2_OpenEnded_mscoco_test2015_questions.json",
    "vg": "VG_questions.json",
}
ANNOTATION_FILES = {
    "train": "v2_mscoco_train2014_annotations.json",
    "val": "v2_mscoco_val2014_annotations.json",
    "vg": "VG_annotations.json",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    stats = vqa.build_vqa_demo(root, seed=3, sizes=TINY)
    return root, stats


def _load(root, name):
    return json.loads((root / "vqa" / name).read_text())


def _obj(colour, shape, size, box, material="rubber"):
    return sc.Obj(colour=colour, shape=shape, size=size, material=material, box=box)


# --------------------------------------------------------------------------- files and schemas


def test_question_files_have_real_schema(built):
    root, _ = built
    for split, name in QUESTION_FILES.items():
        data = _load(root, name)
        assert list(data) == ["info", "task_type", "data_type", "license", "data_subtype", "questions"]
        assert data["task_type"] == "Open-Ended" and data["data_type"] == "mscoco"
        assert data["questions"], split
        for q in data["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert isinstance(q["image_id"], int) and isinstance(q["question_id"], int)
            assert q["question"].endswith("?") and q["question"][0].isupper()
    assert _load(root, QUESTION_FILES["test"])["data_subtype"] == "test2015"
    assert not (root / "vqa" / "v2_mscoco_test2015_annotations.json").exists()


def test_annotation_files_have_real_schema(built):
    root, _ = built
    keys = {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"}
    for name in ANNOTATION_FILES.values():
        data = _load(root, name)
        assert list(data) == ["info", "license", "data_subtype", "annotations", "data_type"]
        for a in data["annotations"]:
            assert set(a) == keys
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            for x in a["answers"]:
                assert set(x) == {"answer", "answer_confidence", "answer_id"}
                assert x["answer_confidence"] in {"yes", "maybe", "no"}
            if a["answer_type"] == "number":
                assert a["multiple_choice_answer"] in {str(n) for n in range(7)}
            if a["answer_type"] == "yes/no":
                assert a["multiple_choice_answer"] in {"yes", "no"}


def test_questions_and_annotations_pair_one_to_one(built):
    root, _ = built
    for split in ("train", "val", "vg"):
        qs = _load(root, QUESTION_FILES[split])["questions"]
        anns = _load(root, ANNOTATION_FILES[split])["annotations"]
        q_ids = [q["question_id"] for q in qs]
        assert len(set(q_ids)) == len(q_ids)
        assert sorted(q_ids) == sorted(a["question_id"] for a in anns)
        by_id = {q["question_id"]: q["image_id"] for q in qs}
        assert all(by_id[a["question_id"]] == a["image_id"] for a in anns)


def test_ids_unique_across_splits_and_vg_reuses_train(built):
    root, _ = built
    images = {s: {q["image_id"] for q in _load(root, n)["questions"]} for s, n in QUESTION_FILES.items()}
    assert not images["train"] & images["val"] and not images["val"] & images["test"]
    assert not images["train"] & images["test"]
    assert images["vg"] <= images["train"]
    all_qids = [q["question_id"] for n in QUESTION_FILES.values() for q in _load(root, n)["questions"]]
    assert len(all_qids) == len(set(all_qids))
    for split in ("train", "val", "test"):  # question_id = image_id * 1000 + k like the real ones
        assert all(q["question_id"] // 1000 == q["image_id"] for q in _load(root, QUESTION_FILES[split])["questions"])


def test_every_question_image_has_a_feature_file(built):
    root, _ = built
    files = {}
    for path in (root / "coco_extract").rglob("*.npz"):
        match = re.search(r"_(\d+)\.jpg\.npz$", path.name)
        assert match and len(match.group(1)) == 12, path.name
        files[int(match.group(1))] = path
    for name in QUESTION_FILES.values():
        for q in _load(root, name)["questions"]:
            assert q["image_id"] in files
            assert files[q["image_id"]].name.endswith(f"_{q['image_id']:012d}.jpg.npz")
    assert {p.parent.name for p in files.values()} == {"train2014", "val2014", "test2015"}


def test_feature_file_matches_bottom_up_layout(built):
    root, _ = built
    path = sorted((root / "coco_extract" / "val2014").glob("COCO_val2014_*.jpg.npz"))[0]
    with np.load(path) as f:
        assert set(f.files) == {"x", "bbox", "image_h", "image_w", "num_bbox"}
        x, bbox = f["x"], f["bbox"]
        h, w, k = int(f["image_h"]), int(f["image_w"]), int(f["num_bbox"])
    assert x.dtype == np.float32 and x.shape == (sc.FEATURE_DIM, k)
    assert (x >= 0).all() and (x == 0).mean() > 0.5  # ReLU-like and sparse
    assert bbox.dtype == np.float32 and bbox.shape == (k, 4)
    assert (bbox[:, 0] >= 0).all() and (bbox[:, 2] <= w).all()
    assert (bbox[:, 1] >= 0).all() and (bbox[:, 3] <= h).all()
    assert (bbox[:, 0] < bbox[:, 2]).all() and (bbox[:, 1] < bbox[:, 3]).all()
    assert 375 <= h <= 480 and 500 <= w <= 640 and 5 <= k <= 14


# --------------------------------------------------------------------------- determinism and marker


def test_same_seed_gives_identical_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    small = dict(TINY, train=6, val=3, test=2, vg=2)
    assert vqa.build_vqa_demo(a, seed=7, sizes=small) == vqa.build_vqa_demo(b, seed=7, sizes=small)
    assert_same_files(a, b)
    c = tmp_path / "c"
    vqa.build_vqa_demo(c, seed=8, sizes=small)
    name = "vqa/" + QUESTION_FILES["train"]
    assert (c / name).read_bytes() != (a / name).read_bytes()


def test_marker_short_circuits_and_is_written_last(tmp_path, monkeypatch):
    small = dict(TINY, train=4, val=2, test=1, vg=1)
    stats = vqa.build_vqa_demo(tmp_path, seed=1, sizes=small)
    marker = json.loads((tmp_path / "vqa" / ".demo_complete").read_text())
    assert marker["version"] == vqa.VERSION and marker["seed"] == 1 and marker["sizes"]["train"] == 4

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the marker matched")

    monkeypatch.setattr(vqa.sc, "write_feature_file", fail)
    monkeypatch.setattr(vqa, "atomic_write_json", fail)
    assert vqa.build_vqa_demo(tmp_path, seed=1, sizes=small) == stats
    with pytest.raises(AssertionError):  # another seed must rebuild
        vqa.build_vqa_demo(tmp_path, seed=2, sizes=small)
    assert not (tmp_path / "vqa" / ".demo_complete").exists()  # interrupted build is not "complete"


# --------------------------------------------------------------------------- spatial questions


def _hand_scene():
    """Row: blue cube (x~100) | red ball (x~300) | green cone (x~500); yellow cylinder above the ball."""
    return [
        _obj("blue", "cube", "large", (60.0, 300.0, 140.0, 380.0)),
        _obj("red", "ball", "small", (275.0, 315.0, 325.0, 365.0)),
        _obj("green", "cone", "large", (460.0, 290.0, 540.0, 390.0)),
        _obj("yellow", "cylinder", "small", (280.0, 60.0, 320.0, 115.0)),
    ]


def test_spatial_relations_on_hand_scene():
    objs = _hand_scene()
    assert sc.nearest_in_direction(objs, 1, "left") == 0
    assert sc.nearest_in_direction(objs, 1, "right") == 2
    assert sc.nearest_in_direction(objs, 1, "above") == 3
    assert sc.nearest_in_direction(objs, 0, "left") is None
    assert sc.relation(objs[1], objs[0], "right") is True
    assert sc.relation(objs[1], objs[0], "left") is False
    assert sc.relation(objs[3], objs[1], "left") is None  # same column: too close to call
    # Two objects almost equally near on the left: no unambiguous answer.
    tie = objs[:3] + [_obj("white", "cube", "small", (160.0, 220.0, 200.0, 260.0))]
    tie[0] = _obj("blue", "cube", "large", (140.0, 300.0, 200.0, 360.0))
    assert sc.nearest_in_direction(tie, 1, "left") is None


def test_generated_spatial_questions_on_hand_scene_are_correct():
    objs = _hand_scene()
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(200):
        for q in vqa.generate_questions(objs, rng, 8):
            text, ans = q["question"], q["answer"]
            if text == "What color is the object to the left of the red ball?":
                assert ans == "blue"
            if re.fullmatch(r"What shape is (above|over) the red ball\?", text):
                assert ans == "cylinder"
            if text == "Is the red ball to the right of the blue cube?":
                assert ans == "yes"
            if text == "Is the red ball to the left of the blue cube?":
                assert ans == "no"
            seen += q["meta"]["kind"].startswith("spatial")
    assert seen > 100


def test_generated_spatial_answers_agree_with_boxes():
    rng = np.random.default_rng(11)
    checked = 0
    for scene in sc.make_scenes(40, rng, first_image_id=1):
        objs = scene.objects
        for q in vqa.generate_questions(objs, rng, 8):
            meta = q["meta"]
            if meta["kind"] == "spatial_query":
                target, ref = objs[meta["target"]], objs[meta["ref"]]
                assert sc.offset(target, ref, meta["direction"]) > sc.SPATIAL_MARGIN
                assert q["answer"] == target.attr(meta["asked"])
                if meta["direction"] == "left":
                    assert target.centre[0] < ref.centre[0]
                checked += 1
            elif meta["kind"] == "spatial_yesno":
                off = sc.offset(objs[meta["a"]], objs[meta["b"]], meta["direction"])
                assert q["answer"] == ("yes" if off > sc.SPATIAL_MARGIN else "no")
                assert abs(off) > sc.SPATIAL_MARGIN
                checked += 1
            elif meta["kind"] == "count":
                assert q["answer"] == str(len(sc.matching(objs, **meta["filter"])))
    assert checked > 50


# --------------------------------------------------------------------------- content and stats


def test_all_answer_types_and_stats(built):
    root, stats = built
    types = {a["answer_type"] for a in _load(root, ANNOTATION_FILES["train"])["annotations"]}
    assert types == {"yes/no", "number", "other"}
    assert stats["images"] == {"train": 14, "val": 6, "test": 4, "vg": 5}
    assert stats["questions"]["train"] == len(_load(root, QUESTION_FILES["train"])["questions"])
    assert 6 * 14 * 0.8 <= stats["questions"]["train"] <= 8 * 14
    assert stats["majority_answer"] in {"yes", "no"}
    assert 0 < stats["majority_baseline_acc_val"] < 60
    assert stats["num_answers"] <= 30


def test_scenes_are_plausible_and_attributes_decodable():
    rng = np.random.default_rng(5)
    protos = sc.prototypes()
    for scene in sc.make_scenes(30, rng, first_image_id=100):
        assert 3 <= len(scene.objects) <= 8
        assert len(scene.regions_feat) == len(scene.regions_box) == len(scene.region_object)
        assert 2 <= (scene.region_object == -1).sum() <= 6
        for k in np.flatnonzero(scene.region_object >= 0):
            obj = scene.objects[scene.region_object[k]]
            assert np.allclose(scene.regions_box[k], obj.box)
            for name, values in sc.ATTRIBUTES.items():
                scores = [scene.regions_feat[k] @ protos[f"{name}={v}"] for v in values]
                assert values[int(np.argmax(scores))] == obj.attr(name)
        areas = {s: [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in scene.objects if o.size == s]
                 for s in sc.SIZES}
        if areas["small"] and areas["large"]:
            assert max(areas["small"]) < min(areas["large"])


def test_features_do_not_encode_position():
    """The same object at two positions gets statistically identical features."""
    a = _obj("red", "cube", "small", (10.0, 10.0, 50.0, 50.0))
    b = _obj("red", "cube", "small", (500.0, 300.0, 540.0, 340.0))
    assert np.array_equal(sc.object_signal(a), sc.object_signal(b))


def test_annotators_disagree_but_normalise_back():
    rng = np.random.default_rng(2)
    disagreed = raw = 0
    for truth in ["yes", "no", "0", "2", "gray", "cube", "large", "metal"] * 40:
        answers, mc = vqa.annotate(truth, rng)
        texts = [a["answer"] for a in answers]
        assert mc == truth and len(texts) == 10
        disagreed += len(set(texts)) > 1
        raw += any(t != truth and normalize_result_answer(t) == truth for t in texts)
    assert 100 < disagreed < 320 and raw > 30
    assert normalize_result_answer("Two") == "2" and normalize_result_answer("a cube") == "cube"
    assert normalize_result_answer("Yes.") == "yes" and normalize_result_answer("grey") == "grey"


def test_vqa_accuracy_and_majority_baseline_on_hand_case():
    assert question_accuracy("yes", ["yes"] * 10) == 1.0
    assert question_accuracy("no", ["yes"] * 10) == 0.0
    # 2 of 10 say "2": leaving out one of them leaves 1 match (1/3), else 2 (2/3).
    assert question_accuracy("2", ["two", "2"] + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)

    def ann(mc, answers):
        return {"multiple_choice_answer": mc, "answers": [{"answer": a} for a in answers]}

    train = [ann("yes", []), ann("yes", []), ann("no", []), ann("2", [])]
    val = [ann("yes", ["yes"] * 10), ann("no", ["no"] * 10),
           ann("yes", ["Yes"] * 3 + ["no"] * 7), ann("no", ["yes"] * 2 + ["no"] * 8)]
    answer, acc = majority_baseline(train, val)
    assert answer == "yes"
    # "Yes" normalises to "yes" (annotators disagree); 3 matches: 2/3 when one is left out.
    expected = [1.0, 0.0, (3 * 2 / 3 + 7 * 1.0) / 10, (2 * 1 / 3 + 8 * 2 / 3) / 10]
    assert acc == pytest.approx(100 * sum(expected) / 4)
