"""Packed feature stores: same data as the .npz files, resumable packing, clear refusals."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import core.data.pack as pack_mod
import core.data.packed as packed
from core.data.features import open_features
from core.data.npz import FeatureError, NpzFeatures
from core.data.pack import pack
from core.data.packed import PackedFeatures
from demo.scenes import make_scenes, write_feature_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_IDS = [3, 9, 25, 30, 42, 57, 61, 77, 80, 94, 100]


def name(split: str, iid: int) -> str:
    return f"COCO_{split}_{iid:012d}.jpg.npz"


@pytest.fixture
def coco(tmp_path, npz_writer):
    """``tmp_path/coco/{train2014,val2014}``: 11 + 6 images, 1..40 regions, both ``x`` layouts
    (val2014 from the demo scene generator, ``x`` as [2048, K]).  Returns (root, ids)."""
    root = tmp_path / "coco"
    for n, iid in enumerate(TRAIN_IDS):
        npz_writer(root / "train2014" / name("train2014", iid), 1 + (n * 13) % 40, seed=iid,
                   transposed=n % 2 == 0, height=300 + n, width=500 - n)
    scenes = make_scenes(6, np.random.default_rng(0), 1000)
    for s in scenes:
        write_feature_file(root / "val2014" / name("val2014", s.image_id), s)
    (root / "val2014" / "README.txt").write_text("not a feature file")
    return root, TRAIN_IDS + [s.image_id for s in scenes]


def dirs_of(root: Path) -> list[Path]:
    return [root / "train2014", root / "val2014"]


def same_store(a: Path, b: Path) -> None:
    """Byte-identical rows, equal index arrays and equal headers."""
    header = [json.loads((d / "header.json").read_text()) for d in (a, b)]
    assert header[0] == header[1]
    for f in ("feats.f16", "boxes.f32"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    ia, ib = packed.load_index(a), packed.load_index(b)
    assert all(np.array_equal(ia[k], ib[k]) for k in packed.INDEX_FIELDS)


# --------------------------------------------------------------------------- contents


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_packed_store_returns_the_npz_contents(coco, dtype):
    root, ids = coco
    info = pack(dirs_of(root), root / "packed", dtype=dtype, progress=False)
    ref, store = NpzFeatures(dirs_of(root)), PackedFeatures(root / "packed")
    counts = [len(ref.load(i, 10**6)[0]) for i in ids]
    assert (info["n_images"], info["n_regions"], info["complete"]) == (len(ids), sum(counts), True)
    itemsize = 2 if dtype == "float16" else 4
    assert (root / "packed" / f"feats.f{8 * itemsize}").stat().st_size == \
        sum(counts) * 2048 * itemsize                       # rows concatenated, no padding
    assert sorted(store.paths) == sorted(ids)
    for iid in ids:
        for max_regions in (100, 5):
            want_x, want_b, want_size = ref.load(iid, max_regions)
            x, b, size = store.load(iid, max_regions)
            assert x.dtype == np.float32 and x.shape == want_x.shape and x.flags.writeable
            if dtype == "float16":
                assert np.allclose(x, want_x, rtol=1e-3, atol=1e-3)
            else:
                assert np.array_equal(x, want_x)
            assert b.dtype == np.float32 and np.array_equal(b, want_b)
            assert size == want_size and all(isinstance(v, float) for v in size)


def test_open_features_picks_a_finished_store_for_its_folders(coco, monkeypatch):
    root, ids = coco
    assert type(open_features(dirs_of(root))) is NpzFeatures
    pack(dirs_of(root), root / "packed", progress=False)
    both = open_features(dirs_of(root))
    assert type(both) is PackedFeatures and sorted(both.paths) == sorted(ids)
    val = open_features([root / "val2014"])                 # a subset of the sources
    assert type(val) is PackedFeatures and sorted(val.paths) == ids[len(TRAIN_IDS):]
    assert TRAIN_IDS[0] not in val.paths
    assert type(open_features(dirs_of(root), feat_size=1024)) is NpzFeatures
    (root / "test2015").mkdir()
    assert type(open_features([root / "test2015"])) is NpzFeatures    # not packed
    monkeypatch.chdir(root.parent)                          # relative dirs work too
    assert type(open_features([Path("coco/val2014")])) is PackedFeatures
    header = json.loads((root / "packed" / "header.json").read_text())
    (root / "packed" / "header.json").write_text(json.dumps({**header, "complete": False}))
    assert type(open_features(dirs_of(root))) is NpzFeatures            # unfinished


def test_store_found_by_folder_name_after_the_tree_moved(coco):
    root, ids = coco
    pack(dirs_of(root), root / "packed", progress=False)
    moved = root.rename(root.parent / "moved")
    feats = open_features([moved / "train2014"])
    assert type(feats) is PackedFeatures and sorted(feats.paths) == TRAIN_IDS


# --------------------------------------------------------------------------- resuming


def failing_after(n: int, error):
    """A ``read_npz`` that reads ``n`` files and then fails like an interruption."""
    calls, real = [0], pack_mod.read_npz

    def read(*args):
        calls[0] += 1
        if calls[0] > n:
            error()
        return real(*args)
    return read


def test_interrupted_pack_resumes_to_the_same_store(coco, monkeypatch):
    root, _ = coco
    pack(dirs_of(root), root / "reference", progress=False)

    def interrupt():
        raise KeyboardInterrupt
    monkeypatch.setattr(pack_mod, "read_npz", failing_after(7, interrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(dirs_of(root), root / "packed", progress=False, checkpoint_every=3)
    progress = json.loads((root / "packed" / "progress.json").read_text())
    assert progress["images_done"] == 7                      # checkpointed on the way out
    assert type(open_features(dirs_of(root))) is NpzFeatures   # unfinished: not used
    monkeypatch.undo()
    info = pack(dirs_of(root), root / "packed", progress=False, checkpoint_every=3)
    assert info["resumed_at"] == 7 and not (root / "packed" / "progress.json").exists()
    same_store(root / "packed", root / "reference")


def test_killed_pack_resumes_from_its_last_checkpoint(coco):
    root, _ = coco
    pack(dirs_of(root), root / "reference", progress=False)
    script = (f"import os, core.data.pack as p\n"
              f"real, n = p.read_npz, [0]\n"
              f"def read(*a):\n"
              f"    n[0] += 1\n"
              f"    if n[0] > 7: os._exit(9)\n"       # no cleanup, like a SIGKILL
              f"    return real(*a)\n"
              f"p.read_npz = read\n"
              f"p.pack({[str(d) for d in dirs_of(root)]}, {str(root / 'packed')!r}, "
              f"progress=False, checkpoint_every=3)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert done.returncode == 9, done.stderr.decode()
    assert json.loads((root / "packed" / "progress.json").read_text())["images_done"] == 6
    info = pack(dirs_of(root), root / "packed", progress=False, checkpoint_every=3)
    assert info["resumed_at"] == 6
    same_store(root / "packed", root / "reference")


def test_unfinished_store_of_other_files_is_not_resumed(coco, npz_writer, monkeypatch):
    root, _ = coco

    def interrupt():
        raise KeyboardInterrupt
    monkeypatch.setattr(pack_mod, "read_npz", failing_after(4, interrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(dirs_of(root), root / "packed", progress=False)
    monkeypatch.undo()
    npz_writer(root / "val2014" / name("val2014", 5), 3)
    with pytest.raises(FeatureError, match="unfinished packed store .* --overwrite"):
        pack(dirs_of(root), root / "packed", progress=False)
    with pytest.raises(FeatureError, match="unfinished packed store"):
        pack(dirs_of(root), root / "packed", dtype="float32", progress=False)
    assert pack(dirs_of(root), root / "packed", progress=False, overwrite=True)["complete"]


# --------------------------------------------------------------------------- refusals


def test_finished_store_is_not_overwritten_without_the_flag(coco):
    root, _ = coco
    pack(dirs_of(root), root / "packed", progress=False)
    with pytest.raises(FeatureError) as e:
        pack(dirs_of(root), root / "packed", dtype="float32", progress=False)
    assert str(root / "packed") in str(e.value) and "--overwrite" in str(e.value)
    info = pack(dirs_of(root), root / "packed", dtype="float32", progress=False, overwrite=True)
    assert info["dtype"] == "float32" and not (root / "packed" / "feats.f16").exists()


def test_folder_with_other_files_is_refused(coco):
    root, _ = coco
    with pytest.raises(FeatureError, match="not empty"):
        pack(dirs_of(root), root / "val2014" / "..", progress=False, overwrite=True)
    with pytest.raises(FeatureError, match="one of the source folders"):
        pack(dirs_of(root), root / "val2014", progress=False)


def test_folder_without_feature_files_names_the_patterns_looked_for(tmp_path):
    (tmp_path / "flickr").mkdir()
    (tmp_path / "flickr" / "README.txt").write_text("no features here")
    with pytest.raises(FeatureError, match=r"no feature files named by an image id \('<id>.npz', "
                       r"'<id>.jpg.npz' or '\*_<id>.jpg.npz'\) in .*flickr"):
        pack([tmp_path / "flickr"], tmp_path / "store", progress=False)


@pytest.mark.parametrize("broken", ["x", "bbox", "key"])
def test_bad_source_file_is_named(coco, npz_writer, broken, capsys):
    root, _ = coco
    bad = root / "val2014" / name("val2014", 500)
    if broken == "x":
        npz_writer(bad, 4, x=np.zeros((4, 100), np.float32))
    elif broken == "bbox":
        npz_writer(bad, 4, bbox=np.zeros((4, 5), np.float32))
    else:
        np.savez(bad, x=np.zeros((4, 2048), np.float32), bbox=np.zeros((4, 4), np.float32))
    with pytest.raises(FeatureError, match=f"{bad}: (field '{broken}'|missing key)"):
        pack(dirs_of(root), root / "packed", progress=False)
    from pack_features import main
    assert main(["--src", *map(str, dirs_of(root)), "--out", str(root / "packed")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]          # after the progress bars
    assert err.startswith(f"error: {bad}: ")
    if broken == "x":          # found after the 11 train images were packed: they are kept
        assert "rerun to resume" in err


def test_cli_packs_and_summarises(coco, capsys):
    root, ids = coco
    from pack_features import main
    assert main(["--src", *map(str, dirs_of(root)), "--out", str(root / "packed"),
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"packed {len(ids)} images, ") and "(float32)" in out


# --------------------------------------------------------------------------- reader


def test_check_and_load_errors_name_the_image_and_the_store(coco):
    root, _ = coco
    pack(dirs_of(root), root / "packed", progress=False)
    store = open_features([root / "val2014"])
    store.check({1000: "question 1"})
    with pytest.raises(FeatureError) as e:
        store.check({1000: "question 1", 9: "question 2 in q.json", 7: "question 3"})
    msg = str(e.value)
    assert msg.startswith("no features for image id 9 (needed by question 2 in q.json)")
    assert str(root / "packed") in msg and str((root / "val2014").resolve()) in msg
    assert "2 of 3 image ids are not in it" in msg
    with pytest.raises(FeatureError, match="no features for image id 9 in the packed store"):
        store.load(9, 100)
    with pytest.raises(KeyError):
        store.paths[9]
    assert store.paths[1000] == Path(f"{root / 'packed'}/#1000")
    with pytest.raises(FeatureError, match="not a finished packed feature store"):
        PackedFeatures(root / "val2014")
    with pytest.raises(FeatureError, match="1024-d"):
        PackedFeatures(root / "packed", feat_size=1024)


def test_store_pickles_without_its_data(coco):
    root, ids = coco
    pack(dirs_of(root), root / "packed", progress=False)
    store = open_features(dirs_of(root))
    want = store.load(ids[3], 100)
    blob = pickle.dumps(store)
    assert len(blob) < 2000                                 # the rows are ~200 KB
    copy = pickle.loads(blob)
    assert copy._feats is None and copy._index is None
    got = copy.load(ids[3], 100)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
