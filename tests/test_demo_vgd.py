"""Tests for the embedded synthetic visual-grounding demo (demo/vgd.py)."""

import json
import re

import numpy as np
import pytest
import torch

from demo import scenes as sc
from demo import vgd
from demo.build import resolve_sizes
from core.tasks.vgd import proposal_baselines
from core.tasks.vgd.boxes import iou, xywh_to_xyxy
from demokit import assert_same_files

TINY = {"train": 12, "val": 5, "testA": 4, "testB": 4}
KEYS = ["tokens", "image_id", "file_name", "split", "bbox", "name", "height", "width", "ref_id",
        "sent_id", "sent"]
ATTRIBUTE_WORDS = {v: name for name, vals in sc.ATTRIBUTES.items() for v in vals}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    stats = vgd.build_vgd_demo(root, seed=3, sizes=TINY)
    splits = {s: json.loads((root / "vgd" / "demo" / f"{s}.json").read_text()) for s in vgd.SPLITS}
    return root, stats, splits


@pytest.fixture(scope="module")
def plan():
    """The generator's view of the ``built`` demo: objects and private record fields."""
    return vgd.plan_demo(3, resolve_sizes(vgd.DEFAULT_SIZES, TINY))


def _entries(splits):
    return [e for s in vgd.SPLITS for e in splits[s]]


def _load_npz(root, image_id):
    with np.load(vgd.feature_path(root, image_id)) as f:
        return {k: f[k] for k in f.files}


def _gt(entry) -> torch.Tensor:
    return xywh_to_xyxy(torch.tensor([entry["bbox"]], dtype=torch.float64))


# --------------------------------------------------------------------------- files and schema


def test_split_files_have_refer_schema(built):
    _, _, splits = built
    for split, entries in splits.items():
        assert entries, split
        for e in entries:
            assert list(e) == KEYS
            assert e["split"] == split
            assert isinstance(e["image_id"], int) and isinstance(e["ref_id"], int)
            assert isinstance(e["sent_id"], int)
            assert isinstance(e["height"], int) and isinstance(e["width"], int)
            assert e["file_name"] == f"COCO_train2014_{e['image_id']:012d}.jpg"
            assert len(e["bbox"]) == 4 and all(isinstance(v, float) for v in e["bbox"])
            assert e["name"] in sc.SHAPES
            assert e["tokens"] and all(t == t.lower() and re.fullmatch(r"[a-z]+", t) for t in e["tokens"])
            assert e["sent"] == " ".join(e["tokens"])


def test_ids_are_consistent_and_images_unique_to_a_split(built):
    _, _, splits = built
    entries = _entries(splits)
    sent_ids = [e["sent_id"] for e in entries]
    assert len(set(sent_ids)) == len(sent_ids)
    by_ref = {}
    for e in entries:  # one ref = one object: same image and box for all its sentences
        by_ref.setdefault(e["ref_id"], set()).add((e["image_id"], tuple(e["bbox"])))
    assert all(len(v) == 1 for v in by_ref.values())
    images = {s: {e["image_id"] for e in splits[s]} for s in vgd.SPLITS}
    assert sum(len(v) for v in images.values()) == len(set().union(*images.values()))
    assert {s: len(v) for s, v in images.items()} == TINY


def test_refs_per_image_and_sentences_per_ref(built):
    _, _, splits = built
    refs_per_image, sents_per_ref = {}, {}
    for e in _entries(splits):
        refs_per_image.setdefault(e["image_id"], set()).add(e["ref_id"])
        sents_per_ref[e["ref_id"]] = sents_per_ref.get(e["ref_id"], 0) + 1
    assert all(1 <= len(v) <= 3 for v in refs_per_image.values())
    assert all(2 <= n <= 3 for n in sents_per_ref.values())


def test_feature_files_have_100_boxes_inside_the_image(built):
    root, _, splits = built
    names = {p.name for p in (root / "vgd" / "feats").iterdir()}
    assert names == {f"{e['file_name']}.npz" for e in _entries(splits)}
    for e in _entries(splits):
        f = _load_npz(root, e["image_id"])
        assert set(f) == {"x", "bbox", "image_h", "image_w", "num_bbox"}
        assert f["x"].dtype == np.float32 and f["x"].shape == (sc.FEATURE_DIM, 100)
        assert f["bbox"].dtype == np.float32 and f["bbox"].shape == (100, 4)
        assert int(f["num_bbox"]) == 100
        assert (int(f["image_h"]), int(f["image_w"])) == (e["height"], e["width"])
        x1, y1, x2, y2 = f["bbox"].T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x1 <= x2).all() and (y1 <= y2).all()
        assert (x2 <= e["width"] - 1).all() and (y2 <= e["height"] - 1).all()
        assert (f["x"] >= 0).all() and (f["x"] == 0).mean() > 0.85  # ReLU-like and sparse


def test_ground_truth_inside_image_and_grounded_by_a_proposal(built):
    root, _, splits = built
    for e in _entries(splits):
        x, y, w, h = e["bbox"]
        assert x >= 0 and y >= 0 and w > 1 and h > 1
        assert x + w - 1 <= e["width"] - 1 and y + h - 1 <= e["height"] - 1
        ious = iou(torch.from_numpy(_load_npz(root, e["image_id"])["bbox"]).double(), _gt(e))[:, 0]
        assert ious.max() >= 0.5
        assert ious.max() <= vgd.TIGHT_IOU[1] + 1e-6  # never the GT box itself


def test_tight_loose_and_background_proposals_exist(built):
    root, _, splits = built
    e = splits["val"][0]
    ious = iou(torch.from_numpy(_load_npz(root, e["image_id"])["bbox"]).double(), _gt(e))[:, 0]
    assert ((ious >= 0.7).sum() >= 1) and ((ious >= 0.3) & (ious <= 0.6)).sum() >= 1
    assert (ious < vgd.BACKGROUND_IOU).sum() >= 40


def test_test_splits_mimic_people_vs_objects(built):
    _, _, splits = built
    assert {e["name"] for e in splits["testA"]} <= set(vgd.TARGET_SHAPES["testA"])
    assert {e["name"] for e in splits["testB"]} <= set(vgd.TARGET_SHAPES["testB"])
    plan = vgd.plan_demo(0, {"train": 30, "val": 0, "testA": 0, "testB": 0})
    assert {r["name"] for im in plan["train"] for r in im.records} == set(sc.SHAPES)


# --------------------------------------------------------------------------- expressions vs. geometry


def _centre(bbox):
    x, y, w, h = bbox
    return x + (w - 1) / 2, y + (h - 1) / 2


def _at(centre, like: sc.Obj) -> sc.Obj:
    """``like`` moved (as a tiny box) to ``centre``: relations then use the written bbox."""
    cx, cy = centre
    return sc.Obj(like.colour, like.shape, like.size, like.material, (cx, cy, cx, cy))


def test_written_records_equal_the_plan(built, plan):
    _, _, splits = built
    for split in vgd.SPLITS:
        records = [r for im in plan[split] for r in im.records]
        assert vgd.strip_private(records) == splits[split]


@pytest.mark.parametrize("seed", [3, 11])
def test_expressions_agree_with_boxes(seed):
    plan = vgd.plan_demo(seed, {"train": 40, "val": 0, "testA": 0, "testB": 0})
    seen = set()
    for image in plan["train"]:
        objs = image.objects
        for r in image.records:
            meta, idx = r["_meta"], r["_target"]
            target = _at(_centre(r["bbox"]), objs[idx])
            seen.add(meta["kind"])
            if meta["kind"] == "attr":  # the attribute words pick out the target alone
                values = {ATTRIBUTE_WORDS[t]: t for t in r["tokens"] if t in ATTRIBUTE_WORDS}
                assert sc.matching(objs, **values) == [idx], r["sent"]
            elif meta["kind"] == "relation":
                ref = objs[meta["ref"]]
                assert sc.relation(target, ref, meta["direction"]) is True, r["sent"]
                assert idx in meta["group"] and r["tokens"][-1] in (ref.shape, "object", "thing")
                rivals = [j for j in meta["group"] if j not in (idx, meta["ref"])
                          and sc.relation(objs[j], ref, meta["direction"])]
                dist = lambda o: np.hypot(o.centre[0] - ref.centre[0], o.centre[1] - ref.centre[1])
                assert all(dist(objs[j]) > dist(target) for j in rivals), r["sent"]
            else:
                assert len(meta["group"]) >= 2 and idx in meta["group"]
                for j in meta["group"]:
                    if j != idx:
                        assert sc.relation(target, objs[j], meta["direction"]) is True, r["sent"]
    assert seen == {"attr", "relation", "extreme"}


def _row_scene():
    """Row: blue cube (x~100) | red ball (x~300) | green cube (x~500), all at one height."""
    return [
        sc.Obj("blue", "cube", "large", "rubber", (60.0, 300.0, 140.0, 380.0)),
        sc.Obj("red", "ball", "small", "metal", (275.0, 315.0, 325.0, 365.0)),
        sc.Obj("green", "cube", "large", "rubber", (460.0, 290.0, 540.0, 370.0)),
    ]


def test_relation_and_extreme_on_hand_scene():
    objs, rng = _row_scene(), np.random.default_rng(0)
    relations = [m for m in (vgd._ref_relation(objs, 0, rng) for _ in range(200)) if m is not None]
    assert relations and all(meta["direction"] == "left" for _, meta in relations)
    for text, meta in relations:  # "... left of the red ball" or "the cube left of the green cube"
        assert meta["ref"] in (1, 2) and "left" in text.split()
        if meta["ref"] == 2:
            assert meta["group"] == [0, 2] and "cube" in text.split()[:2]
    extremes = [m for m in (vgd._ref_extreme(objs, 0, rng) for _ in range(200)) if m is not None]
    assert extremes and all(meta["direction"] == "left" for _, meta in extremes)
    assert all(vgd._ref_extreme(objs, 1, rng) is None for _ in range(50))  # the middle one


# --------------------------------------------------------------------------- features


def test_best_proposal_features_decode_the_target(built, plan):
    """Attributes are recoverable: the best proposal's strongest prototype per attribute
    is the target's value, and tight boxes carry more object signal than loose ones."""
    root, _, _ = built
    protos = sc.prototypes()
    for image in plan["val"] + plan["testA"]:
        feats = _load_npz(root, image.image_id)["x"].T
        for r in image.records:
            target = image.objects[r["_target"]]
            ious = iou(torch.from_numpy(image.proposals).double(), _gt(r))[:, 0].numpy()
            best = feats[int(ious.argmax())]
            for name, vals in sc.ATTRIBUTES.items():
                scores = [best @ protos[f"{name}={v}"] for v in vals]
                assert vals[int(np.argmax(scores))] == target.attr(name)
            loose = (ious >= 0.3) & (ious <= 0.6)
            obj_score = feats @ protos["object"]
            assert loose.any() and obj_score[int(ious.argmax())] > obj_score[loose].mean()


def test_features_are_rounded_and_background_is_background(built, plan):
    root, _, _ = built
    protos = sc.prototypes()
    for image in plan["train"][:4]:
        f = _load_npz(root, image.image_id)
        assert np.array_equal(f["bbox"], image.proposals)
        assert np.array_equal(f["x"], np.round(f["x"] / vgd.FEATURE_STEP) * vgd.FEATURE_STEP)
        overlap = iou(torch.from_numpy(f["bbox"]).double(), torch.from_numpy(image.gt_xyxy)).max(1).values
        looks_bg = f["x"].T @ protos["background"] > f["x"].T @ protos["object"]
        assert np.array_equal(looks_bg, overlap.numpy() < vgd.BACKGROUND_IOU)
        assert looks_bg.sum() >= 100 - 7 * len(image.objects)


def test_features_do_not_encode_position(plan):
    """Shifting a whole scene leaves every proposal's feature unchanged: only the boxes
    tell where things are, so spatial expressions need them."""
    image = plan["val"][0]
    shift = np.array([7.0, -3.0, 7.0, -3.0])
    moved = [sc.Obj(o.colour, o.shape, o.size, o.material, tuple(np.add(o.box, shift))) for o in image.objects]
    same = vgd.proposal_features(np.random.default_rng(5), image.objects, image.gt_xyxy, image.proposals)
    shifted = vgd.proposal_features(np.random.default_rng(5), moved, image.gt_xyxy + shift,
                                    image.proposals + shift.astype(np.float32))
    assert np.array_equal(same, shifted)


# --------------------------------------------------------------------------- determinism, marker, stats


def test_same_seed_gives_identical_files(tmp_path):
    small = {"train": 3, "val": 2, "testA": 1, "testB": 1}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert vgd.build_vgd_demo(a, seed=7, sizes=small) == vgd.build_vgd_demo(b, seed=7, sizes=small)
    assert_same_files(a, b)
    vgd.build_vgd_demo(c, seed=8, sizes=small)
    assert (c / "vgd/demo/train.json").read_bytes() != (a / "vgd/demo/train.json").read_bytes()


def test_marker_short_circuits_and_is_written_last(tmp_path, monkeypatch):
    small = {"train": 2, "val": 1, "testA": 1, "testB": 1}
    stats = vgd.build_vgd_demo(tmp_path, seed=1, sizes=small)
    marker = json.loads((tmp_path / "vgd" / "demo" / ".demo_complete").read_text())
    assert marker["version"] == vgd.VERSION and marker["seed"] == 1 and marker["sizes"] == small

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the marker matched")

    monkeypatch.setattr(vgd.sc, "write_feature_file", fail)
    monkeypatch.setattr(vgd, "atomic_write_json", fail)
    assert vgd.build_vgd_demo(tmp_path, seed=1, sizes=small) == stats
    with pytest.raises(AssertionError):  # another seed must rebuild
        vgd.build_vgd_demo(tmp_path, seed=2, sizes=small)
    assert not (tmp_path / "vgd" / "demo" / ".demo_complete").exists()


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown size keys"):
        vgd.build_vgd_demo(tmp_path, sizes={"test": 3})
    with pytest.raises(ValueError, match="non-negative"):
        vgd.build_vgd_demo(tmp_path, sizes={"train": -1})


def test_stats_match_files_and_baselines(built):
    root, stats, splits = built
    assert stats["images"] == TINY
    assert stats["sentences"] == {s: len(v) for s, v in splits.items()}
    assert stats["refs"] == {s: len({e["ref_id"] for e in v}) for s, v in splits.items()}
    assert sum(stats["kinds"].values()) == len(_entries(splits))
    proposals = {e["image_id"]: _load_npz(root, e["image_id"])["bbox"] for e in splits["val"]}
    rand, largest = proposal_baselines(splits["val"], proposals)
    assert stats["random_proposal_acc_val"] == round(rand, 2)
    assert stats["largest_proposal_acc_val"] == round(largest, 2)
    assert 0 < rand < 15


def test_spatial_fraction_is_about_forty_percent():
    plan = vgd.plan_demo(0, {"train": 80, "val": 0, "testA": 0, "testB": 0})
    stats = vgd._stats(plan)
    assert 0.3 <= stats["spatial_fraction"] <= 0.5


def test_baselines_on_hand_case():
    # Image 1: GT (10, 10)-(29, 29); proposals: GT-like, far away, and the largest (overlapping).
    # Image 2: GT (0, 0)-(99, 99); the largest proposal is the good one, 1 of 2 hits.
    entries = [{"image_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0]},
               {"image_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0]},
               {"image_id": 2, "bbox": [0.0, 0.0, 100.0, 100.0]}]
    proposals = {1: np.array([[10, 10, 29, 29], [100, 100, 119, 119], [0, 0, 99, 99],
                              [11, 11, 29, 29]], np.float32),
                 2: np.array([[0, 0, 99, 99], [0, 0, 9, 9]], np.float32)}
    rand, largest = proposal_baselines(entries, proposals)
    assert rand == pytest.approx(100 * (0.5 + 0.5 + 0.5) / 3)
    assert largest == pytest.approx(100 / 3)
    assert proposal_baselines([], {}) == (0.0, 0.0)


def test_cli_builds_and_prints_stats(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vgd, "DEFAULT_SIZES", {"train": 2, "val": 1, "testA": 1, "testB": 1})
    vgd.main(["--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert '"random_proposal_acc_val"' in out and "elapsed_s:" in out
    assert (tmp_path / "vgd" / "demo" / ".demo_complete").exists()
