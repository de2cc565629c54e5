"""Region feature files (core/data/npz.py): missing, misshapen or broken files stop with one
message naming the file, the field and what was expected."""
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import core.data.pack as pack_mod
import core.data.packed as packed
from conftest import (BAD_IMAGE, VAL_QUESTIONS as QFILE, assert_nothing_saved, feature,
                      run_folder, script_error)
from core.data.npz import FeatureError, NpzFeatures, read_npz


def _feature(root, iid):
    return root / "coco_extract" / "val2014" / f"COCO_val2014_{iid:012d}.jpg.npz"


def test_missing_feature_file_names_image_question_and_folder(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    _feature(root, 393274).unlink()
    _feature(root, 42).unlink()
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(FeatureError) as e:
        task.dataset("val")
    msg = str(e.value)
    questions = json.loads((root / "vqa" / QFILE).read_text())["questions"]
    first_missing = next(q for q in questions if q["image_id"] in (42, 393274))
    iid, qid = first_missing["image_id"], first_missing["question_id"]
    assert f"no feature file for image id {iid}" in msg
    assert f"question {qid} in {root / 'vqa' / QFILE}" in msg
    assert str(root / "coco_extract" / "val2014") in msg
    assert f"_{iid:012d}.jpg.npz" in msg
    assert "2 of 19 image ids have no feature file" in msg


def test_missing_feature_folder(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    (root / "coco_extract" / "val2014").rename(root / "coco_extract" / "val")
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(FeatureError) as e:
        task.dataset("val")
    assert str(root / "coco_extract" / "val2014") in str(e.value)
    assert "19 of 19 image ids" in str(e.value)


def _load_item_of_image(task, iid):
    ds = task.dataset("val")
    return ds[next(i for i, e in enumerate(ds.entries) if e["image_id"] == iid)]


@pytest.mark.parametrize("x_shape, words", [
    ((512, 10), ["field 'x' has shape [512, 10]", "expected [2048, K] or [K, 2048]"]),
    ((2048,), ["field 'x' has shape [2048]", "expected [2048, K] or [K, 2048]"]),
    ((10, 2048, 1), ["field 'x' has shape [10, 2048, 1]"]),
])
def test_feature_x_with_wrong_shape(vqa_val_root, vqa_task, npz_writer, x_shape, words):
    root, _ = vqa_val_root
    path = _feature(root, 262162)
    npz_writer(path, 10, x=np.zeros(x_shape, np.float32))
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(FeatureError) as e:
        _load_item_of_image(task, 262162)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    for w in words:
        assert w in msg


@pytest.mark.parametrize("transposed", [True, False])
def test_feature_bbox_with_wrong_row_count(vqa_val_root, vqa_task, npz_writer, transposed):
    root, _ = vqa_val_root
    path = _feature(root, 262162)
    npz_writer(path, 10, transposed=transposed, bbox=np.zeros((9, 4), np.float32))
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(FeatureError) as e:
        _load_item_of_image(task, 262162)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert "field 'bbox' has shape [9, 4], expected [10, 4]" in msg


def test_feature_bbox_with_wrong_columns(tmp_path, npz_writer):
    path = tmp_path / "COCO_val2014_000000000001.jpg.npz"
    npz_writer(path, 5, bbox=np.zeros((5, 2), np.float32))
    with pytest.raises(FeatureError, match=r"field 'bbox' has shape \[5, 2\], expected \[5, 4\]"):
        read_npz(path, 2048, 100)


def test_feature_file_missing_a_key_or_unreadable(tmp_path):
    path = tmp_path / "COCO_val2014_000000000001.jpg.npz"
    np.savez(path, x=np.ones((2048, 3), np.float32), image_h=1, image_w=1)
    with pytest.raises(FeatureError) as e:
        read_npz(path, 2048, 100)
    assert str(e.value).startswith(f"{path}: missing key(s) bbox")
    assert "has x, bbox, image_h, image_w" in str(e.value)
    path.write_bytes(b"definitely not a zip file")
    with pytest.raises(FeatureError) as e:
        read_npz(path, 2048, 100)
    assert str(e.value).startswith(f"{path}: not a readable .npz feature file")


def test_feature_file_missing_key_message_is_clean(tmp_path):
    path = tmp_path / "COCO_val2014_000000000001.jpg.npz"
    np.savez(path, x=np.ones((2048, 3), np.float32), image_h=1, image_w=1)
    with pytest.raises(FeatureError) as e:
        read_npz(path, 2048, 100)
    assert str(e.value).startswith(f"{path}: missing key(s) bbox (a bottom-up feature file "
                                   f"has x, bbox, image_h, image_w")


def test_features_load_unknown_image_id(tmp_path):
    feats = NpzFeatures([tmp_path / "val2014"])
    with pytest.raises(FeatureError, match=f"no feature file for image id 5 in {tmp_path}"):
        feats.load(5, 100)


def reader_error(root: Path, iid: int = BAD_IMAGE) -> str:
    with pytest.raises(FeatureError) as e:
        read_npz(feature(root, iid), 2048, 100)
    return str(e.value)


def write_npz(path: Path, **over) -> None:
    """``path`` rewritten with its own arrays, some replaced (``None``: key left out)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def put_value(key: str, index: tuple, value: float) -> Callable[[Path], None]:
    def make(root):
        path = feature(root)
        with np.load(path) as f:
            a = f[key].copy()
        a[index] = value
        write_npz(path, **{key: a})
    return make


def truncate(root):
    path = feature(root)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def empty(root):
    feature(root).write_bytes(b"")


def corrupt_deflate(root):
    """A compressed member whose deflate stream is damaged near its start (bytes flipped)."""
    path = feature(root)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez_compressed(path, **arrays)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        start = z.getinfo("x.npy").header_offset + 30 + len("x.npy")
    for i in range(start + 20, start + 84):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite(**over) -> Callable[[Path], None]:
    return lambda root: write_npz(feature(root), **over)


@dataclass
class Case:
    name: str
    make: Callable[[Path], None]
    words: list[str]            # in the message; "{path}" is the broken file
    run: str = "reader"         # reader | train | train-workers | search | pack
    extra: list[str] = field(default_factory=list)


FEATURE_CASES = [
    Case("nan in x", put_value("x", (3, 17), np.nan),
         ["{path}: field 'x' holds 1 non-finite value(s) (nan), the first at region 3 of image "
          f"id {BAD_IMAGE}, column 17"], run="train"),
    Case("inf in x, read in a worker", put_value("x", (5, 0), np.inf),
         ["{path}: field 'x' holds 1 non-finite value(s) (inf), the first at region 5 of "
          f"image id {BAD_IMAGE}, column 0"], run="train-workers"),
    Case("-inf in bbox", put_value("bbox", (2, 1), -np.inf),
         ["{path}: field 'bbox' holds 1 non-finite value(s) (inf), the first at region 2"]),
    Case("truncated npz", truncate,
         ["{path}: not a readable .npz feature file (BadZipFile: "], run="train"),
    Case("zero-byte npz", empty, ["{path}: not a readable .npz feature file (EOFError: "]),
    Case("corrupt deflate bytes", corrupt_deflate,
         ["{path}: not a readable .npz feature file (zlib.error: Error -3 while decompressing"]),
    Case("x of strings", rewrite(x=np.full((2048, 4), "1.0")),
         ["{path}: field 'x' has dtype <U3, expected float32 or float16 numbers"]),
    Case("x of objects (needs pickle)", rewrite(x=np.array([None, 1.0], dtype=object)),
         ["{path}: not a readable .npz feature file (ValueError: ", "allow_pickle=False"]),
    Case("image_h an array", rewrite(image_h=np.array([480, 640])),
         ["{path}: field 'image_h' is [480, 640] (int64), expected one positive number"]),
    Case("image_w nan, at pack time", rewrite(image_w=np.float64("nan")),
         ["{path}: field 'image_w' is nan (float64), expected one positive number"], run="pack"),
    Case("nan in x, at pack time", put_value("x", (1, 0), np.nan),
         ["{path}: field 'x' holds 1 non-finite value(s) (nan), the first at region 1 of "
          f"image id {BAD_IMAGE}, column 0"], run="pack"),
    Case("missing image_w key, at pack time", rewrite(image_w=None),
         ["{path}: missing key(s) image_w"], run="pack"),
]


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: c.name)
def test_broken_feature_file(case, vqa_val_root, capsys):
    root, _ = vqa_val_root
    case.make(root)
    if case.run == "reader":
        message = reader_error(root)
    elif case.run == "pack":
        store = root / "coco_extract" / "packed"
        with pytest.raises(FeatureError) as e:
            pack_mod.pack([root / "coco_extract" / "val2014"], store, progress=False)
        message = str(e.value)
        assert packed.find_store([root / "coco_extract" / "val2014"], 2048) is None
    else:
        workers = ["--NW=1"] if case.run == "train-workers" else []
        message = script_error(capsys, "train", root, *workers)
        assert_nothing_saved(root)
        assert (run_folder(root) / "log.txt").read_text().rstrip().endswith(message)
    for w in case.words:
        assert w.format(path=feature(root)) in message, message
    assert "\n" not in message
