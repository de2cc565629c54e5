"""Tests for the embedded synthetic Flickr30K retrieval demo (demo/itm.py)."""

import json
import re
import shutil
import threading

import numpy as np
import pytest

from core.data.features import open_features
from core.data.npz import NpzFeatures
from core.data.packed import PackedFeatures
from demo import itm
from demo import scenes as sc
from demokit import assert_same_files

TINY = {"train": 10, "dev": 6, "test": 5}
SEED = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    stats = itm.build_itm_demo(root, seed=SEED, sizes=TINY)
    return root, stats, itm.plan_demo(SEED, TINY)


def _lines(root, name):
    return (root / "itm" / "f30k_precomp" / name).read_text().splitlines()


def _mapping(root):
    return json.loads((root / "itm" / "id_mapping.json").read_text())


# --------------------------------------------------------------------------- file formats


def test_caption_and_id_files_have_the_real_forms(built):
    root, _, plan = built
    first = 0
    for split in itm.SPLITS:
        n = TINY[split]
        caps, ids = _lines(root, f"{split}_caps.txt"), [int(x) for x in _lines(root, f"{split}_ids.txt")]
        assert len(caps) == 5 * n
        images = list(range(first, first + n))  # imgids run on from 0 across train, dev, test
        if split == "train":  # one id per image, like the real train_ids.txt
            assert ids == images
        else:  # one id per caption line, each repeated five times in order
            assert ids == [i for i in images for _ in range(5)]
        assert caps == [c.text for im in plan[split] for c in im.captions]
        assert [im.imgid for im in plan[split]] == images
        first += n


def test_captions_are_flickr_style_and_distinct(built):
    root, _, _ = built
    for split in itm.SPLITS:
        caps = _lines(root, f"{split}_caps.txt")
        for k in range(0, len(caps), 5):
            assert len(set(caps[k:k + 5])) == 5  # five different captions per image
        for cap in caps:
            assert cap[0].isupper() and cap.endswith(" .") and cap == " ".join(cap.split())
            assert all(re.fullmatch(r"[A-Za-z]+|[.,:]", tok) for tok in cap.split()), cap


def test_id_mapping_and_feature_files(built):
    root, _, _ = built
    mapping = _mapping(root)
    total = sum(TINY.values())
    assert list(mapping) == [str(i) for i in range(total)]
    names = list(mapping.values())
    assert len(set(names)) == total and names == sorted(names)  # imgids follow file names
    assert all(re.fullmatch(r"[1-9]\d{7,9}\.jpg", n) for n in names)
    files = sorted(p.name for p in (root / "itm" / "feats").iterdir())
    assert files == sorted(f"{n}.npz" for n in names)
    for name in names:
        with np.load(root / "itm" / "feats" / f"{name}.npz") as f:
            assert set(f.files) == {"x", "bbox", "image_h", "image_w", "num_bbox"}
            x, bbox = f["x"], f["bbox"]
            h, w, k = int(f["image_h"]), int(f["image_w"]), int(f["num_bbox"])
        assert k == 36 and x.shape == (sc.FEATURE_DIM, 36) and x.dtype == np.float32
        assert bbox.shape == (36, 4) and bbox.dtype == np.float32
        assert (x >= 0).all() and (x == 0).mean() > 0.5
        assert (bbox[:, :2] >= 0).all() and (bbox[:, 2] <= w).all() and (bbox[:, 3] <= h).all()
        assert (bbox[:, 0] < bbox[:, 2]).all() and (bbox[:, 1] < bbox[:, 3]).all()


def test_the_loader_reads_the_packed_copy_of_the_same_features(built):
    """The demo packs its features (pack_features.py's store): the loader takes the store,
    and reads from it exactly the arrays of every .npz file."""
    root, _, _ = built
    feats = root / "itm" / "feats"
    packed, npz = open_features([feats], sc.FEATURE_DIM), NpzFeatures([feats], sc.FEATURE_DIM)
    assert isinstance(packed, PackedFeatures) and sorted(packed.paths) == sorted(npz.paths)
    for image_id in npz.paths:
        (x, boxes, size), (x0, boxes0, size0) = packed.load(image_id, 36), npz.load(image_id, 36)
        assert np.array_equal(x, x0) and np.array_equal(boxes, boxes0)
        assert tuple(size) == tuple(size0)


def test_a_demo_built_without_the_store_gets_it_on_the_next_call(built, tmp_path):
    root, _, _ = built
    copy = tmp_path / "demo"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "itm" / "packed")
    itm.build_itm_demo(copy, seed=SEED, sizes=TINY)
    assert isinstance(open_features([copy / "itm" / "feats"], sc.FEATURE_DIM), PackedFeatures)


def test_object_regions_carry_their_attributes_not_position(built):
    _, _, plan = built
    image = plan["dev"][0]
    regions = itm.make_regions(image, np.random.default_rng(0))
    assert len(regions.regions_box) == itm.NUM_BOXES
    for k, obj in enumerate(image.objects):
        rows = np.flatnonzero(regions.region_object == k)
        assert 2 <= len(rows) <= 3  # tight box plus 1-2 jittered copies
        signal = sc.object_signal(obj)
        for r in rows:
            feat = regions.regions_feat[r]
            assert feat @ signal / (np.linalg.norm(feat) * np.linalg.norm(signal)) > 0.9
        assert any(np.allclose(regions.regions_box[r], obj.box, atol=1e-3) for r in rows)
    moved = [sc.Obj(o.colour, o.shape, o.size, o.material, (0.0, 0.0, 1.0, 1.0)) for o in image.objects]
    assert all(np.array_equal(sc.object_signal(a), sc.object_signal(b)) for a, b in zip(moved, image.objects))


# --------------------------------------------------------------------------- caption content


def _attribute_values(text):
    """(attribute, value) for every attribute word of a caption, plurals folded."""
    words = itm.attribute_words()
    found = []
    for tok in text.lower().split():
        for cand in (tok, tok[:-1], tok[:-2]):
            if cand in words:
                found.append(words[cand])
                break
    return found


def test_captions_mention_only_what_is_in_the_image(built):
    _, _, plan = built
    for image in (im for s in itm.SPLITS for im in plan[s]):
        objects = image.objects
        for cap in image.captions:
            assert 1 <= len(cap.mentions) <= 3, cap
            values = _attribute_values(cap.text)
            assert values, cap.text
            for name, value in values:  # each named value belongs to a mentioned object showing it
                assert any(name in shown and objects[i].attr(name) == value
                           for i, shown in cap.mentions.items()), (cap.text, name, value)
            shown = {(n, objects[i].attr(n)) for i, names in cap.mentions.items() for n in names if n != "shape"}
            assert shown <= set(values), cap.text  # and every shown adjective is in the text
            if cap.kind == "relation":
                m = cap.meta
                assert sc.relation(objects[m["a"]], objects[m["b"]], m["direction"]) is True
            if cap.kind == "count":
                assert len(sc.matching(objects, **cap.meta["values"])) == cap.meta["count"]
                assert cap.text.lower().split()[0] in {"two", "three", "there", "a"}


def test_five_captions_cover_every_object(built):
    _, _, plan = built
    for image in (im for s in itm.SPLITS for im in plan[s]):
        assert 3 <= len(image.objects) <= itm.MAX_OBJECTS
        covered = set().union(*(c.mentions for c in image.captions))
        assert covered == set(range(len(image.objects)))


def test_caption_kinds_on_hand_scene():
    objects = [
        sc.Obj("blue", "cube", "large", "metal", (60.0, 300.0, 140.0, 380.0)),
        sc.Obj("red", "ball", "small", "rubber", (275.0, 315.0, 325.0, 365.0)),
        sc.Obj("red", "ball", "large", "rubber", (460.0, 290.0, 540.0, 390.0)),
    ]
    rng = np.random.default_rng(1)
    for _ in range(30):
        rel = itm._cap_relation(objects, [0], {}, rng)
        assert 0 in rel.mentions and sc.relation(objects[rel.meta["a"]], objects[rel.meta["b"]],
                                                 rel.meta["direction"]) is True
        count = itm._cap_count(objects, [], {}, rng)
        assert count.meta["count"] == len(sc.matching(objects, **count.meta["values"]))
        stated = itm._cap_statement(objects, [1], {1: ("colour",)}, rng)
        assert re.search(r" is red( \.| and)", stated.text) and "colour" in stated.mentions[1]
    assert itm._cap_single(objects, [0, 1], {}, rng) is None  # one object only
    assert itm._cap_count(objects, [0], {0: ("colour",)}, rng) is None  # never carries a focus


def test_every_caption_says_the_setting_its_distractor_regions_carry(built):
    _, stats, plan = built
    images = [im for s in itm.SPLITS for im in plan[s]]
    for image in images:
        for cap in image.captions:
            assert any(cap.text.endswith(f" {w} .") for w in itm.SETTING_WORDS[image.setting]), cap.text
    assert stats["settings"] == len({im.setting for im in images}) > 1
    for image in plan["dev"]:
        regions = itm.make_regions(image, np.random.default_rng(0))
        support = sc.prototypes()[f"setting={image.setting}"] > 0
        carries = regions.regions_feat[:, support].mean(1) > 0.3
        assert not carries[regions.region_object >= 0].any()     # objects look the same anywhere
        # every region but an object's tight box, 1-2 copies and at most one part box
        assert carries.sum() >= itm.NUM_BOXES - 4 * len(image.objects)


# --------------------------------------------------------------------------- families


def test_near_duplicate_families(built):
    _, stats, plan = built
    images = [im for s in itm.SPLITS for im in plan[s]]
    families = {}
    for im in images:
        families.setdefault(im.family, []).append(im)
    assert any(len(members) >= 2 for members in families.values())
    assert sum(stats["families"].values()) == len(families)
    for members in families.values():
        assert len({im.split for im in members}) == 1 and len(members) <= max(itm.FAMILY_SIZES)
        if len(members) < 2:
            continue
        var = members[0].variation
        j, change = var["object"], var["change"]
        for a in members:
            assert a.variation == var and (a.width, a.height) == (members[0].width, members[0].height)
            assert a.setting == members[0].setting      # hard negatives: the setting does not tell
            cap_attrs = [set(c.mentions.get(j, ())) for c in a.captions]
            if change != "position":  # the difference is shown in one of the captions
                assert any(change in names for names in cap_attrs)
            for b in members:
                if a is b:
                    continue
                same = [o == p for o, p in zip(a.objects, b.objects)]
                assert same.count(False) == 1 and not same[j]
                names = [n for n in sc.ATTRIBUTES if a.objects[j].attr(n) != b.objects[j].attr(n)]
                assert names == ([] if change == "position" else [change])


# --------------------------------------------------------------------------- build behaviour


def test_stats_and_chance_levels(built):
    _, stats, _ = built
    assert stats["images"] == TINY
    assert stats["captions"] == {s: 5 * n for s, n in TINY.items()}
    n_test = TINY["test"]
    assert stats["chance_r1_i2t"] == pytest.approx(100.0 * 5 / (5 * n_test))
    assert stats["chance_r1_t2i"] == pytest.approx(100.0 / n_test)
    assert 5 < stats["mean_caption_words"] < 20
    assert sum(stats["caption_kinds"].values()) == 5 * sum(TINY.values())


def test_same_seed_gives_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    small = {"train": 4, "dev": 2, "test": 2}
    assert itm.build_itm_demo(a, seed=7, sizes=small) == itm.build_itm_demo(b, seed=7, sizes=small)
    # the packed store's header names its source folder, a's or b's
    assert_same_files(a, b, differ=("itm/packed/header.json",))
    itm.build_itm_demo(c, seed=8, sizes=small)
    name = "itm/f30k_precomp/train_caps.txt"
    assert (c / name).read_bytes() != (a / name).read_bytes()


def test_marker_short_circuits_and_is_written_last(tmp_path, monkeypatch):
    small = {"train": 3, "dev": 2, "test": 1}
    stats = itm.build_itm_demo(tmp_path, seed=1, sizes=small)
    marker = json.loads((tmp_path / "itm" / ".demo_complete").read_text())
    assert marker["version"] == itm.VERSION and marker["seed"] == 1 and marker["sizes"] == small

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the marker matched")

    monkeypatch.setattr(itm.sc, "write_feature_file", fail)
    monkeypatch.setattr(itm, "atomic_write_text", fail)
    assert itm.build_itm_demo(tmp_path, seed=1, sizes=small) == stats
    with pytest.raises(AssertionError):  # other sizes must rebuild
        itm.build_itm_demo(tmp_path, seed=1, sizes={"train": 4, "dev": 2, "test": 1})
    assert not (tmp_path / "itm" / ".demo_complete").exists()  # interrupted build is not "complete"


def test_two_builders_at_once_build_it_once(tmp_path, monkeypatch):
    """The ranks of a first torchrun on the demo each call the builder: the second waits on
    the first's lock and finds its build (each feature file written once, one packing)."""
    small = {"train": 6, "dev": 2, "test": 2}
    written, packed = [], []
    write, pack = itm.sc.write_feature_file, itm._pack
    monkeypatch.setattr(itm.sc, "write_feature_file",
                        lambda path, scene: (written.append(path), write(path, scene)))
    monkeypatch.setattr(itm, "_pack", lambda root: (packed.append(root), pack(root)))
    results = []
    builders = [threading.Thread(target=lambda: results.append(
        itm.build_itm_demo(tmp_path, seed=2, sizes=small))) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(written) == sum(small.values()) and len(packed) == 1


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown size keys"):
        itm.build_itm_demo(tmp_path, sizes={"val": 3})
    with pytest.raises(ValueError, match="non-negative"):
        itm.build_itm_demo(tmp_path, sizes={"test": -1})


def test_main_prints_stats_and_elapsed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(itm, "DEFAULT_SIZES", {"train": 2, "dev": 1, "test": 1})
    itm.main(["--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert '"chance_r1_t2i": 100.0' in out and re.search(r"elapsed_s: \d+\.\d\d", out)
    assert (tmp_path / "itm" / ".demo_complete").is_file()
