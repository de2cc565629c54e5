"""preprocess_vgd.py / core.tasks.vgd.refer on the real RefCOCOg (umd) sample in tests/data.

The sample: 15 refs, 28 sentences, 15 images, 108 annotations. Its refs are not grouped by
split (train, train, test, train, ...), and each ref's own ``file_name`` carries an
``_<ann_id>`` suffix, so the image file name must come from instances.json.
"""
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import latin1_into
from core.tasks.vgd import refer
from core.tasks.vgd.refer import ReferError, convert, load_refs, main, write_splits

REAL = Path(__file__).resolve().parent / "data" / "refcocog"
REPO = Path(__file__).resolve().parents[1]
REFS = "refs(umd).p"

# Sentence ids per split in the order of the refs file, checked by hand against refs(umd).p.
SENT_IDS = {"train": [91981, 91982, 73446, 73447, 7892, 7893, 88420, 25880, 25881],
            "val": [4747, 4748, 49558, 49559, 18503, 18504, 62981, 62982, 9101, 9102],
            "test": [85047, 85048, 93873, 39463, 39464, 52465, 52466, 30645, 30646]}
REF_IDS = {"train": [40373, 33195, 8061, 38958, 14954],
           "val": [6835, 24026, 46077, 29181, 8520],
           "test": [3729, 4094, 1744, 2297, 1385]}


@pytest.fixture(scope="module")
def splits():
    return convert("refcocog", REAL)


@pytest.fixture
def raw(tmp_path):
    """A writable copy of the real sample, to make broken variants of."""
    d = tmp_path / "raw"
    shutil.copytree(REAL, d)          # the shared sample is read-only, and so the copy
    d.chmod(0o755)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


def edit_refs(raw_dir: Path, edit, name: str = REFS, protocol: int = 4) -> None:
    """Unpickle, let ``edit(refs)`` change them in place, re-pickle (optionally renamed)."""
    with open(REAL / REFS, "rb") as f:
        refs = pickle.load(f)
    edit(refs)
    (raw_dir / REFS).unlink()
    with open(raw_dir / name, "wb") as f:
        pickle.dump(refs, f, protocol=protocol)


def edit_instances(raw_dir: Path, edit) -> None:
    coco = json.loads((REAL / "instances.json").read_text())
    edit(coco)
    (raw_dir / "instances.json").write_text(json.dumps(coco))


def ref_by_id(refs, ref_id):
    return next(r for r in refs if r["ref_id"] == ref_id)


# --- the conversion on the real sample ----------------------------------------------------

def test_split_sizes(splits):
    assert list(splits) == ["train", "val", "test"]
    assert {s: len(es) for s, es in splits.items()} == {"train": 9, "val": 10, "test": 9}
    assert {s: len({e["ref_id"] for e in es}) for s, es in splits.items()} == \
        {"train": 5, "val": 5, "test": 5}
    assert sum(len(es) for es in splits.values()) == 28


def test_order_of_refs_and_sentences_is_kept(splits):
    assert {s: [e["sent_id"] for e in es] for s, es in splits.items()} == SENT_IDS
    assert {s: list(dict.fromkeys(e["ref_id"] for e in es)) for s, es in splits.items()} == \
        REF_IDS
    assert all(e["split"] == s for s, es in splits.items() for e in es)


def test_entries_checked_by_hand(splits):
    # ref 40373, ann 251837, first sentence: the image is 334 wide, 500 high.
    assert splits["train"][0] == {
        "tokens": ["a", "smiling", "woman", "wearing", "a", "black", "dress", "with", "a",
                   "plaid", "bow", "on", "it", ".", "she", "is", "wearing", "ear", "rings",
                   "and", "a", "watch"],
        "image_id": 122469, "file_name": "COCO_train2014_000000122469.jpg", "split": "train",
        "bbox": [2.04, 78.25, 329.23, 405.6], "name": "person", "height": 500, "width": 334,
        "ref_id": 40373, "sent_id": 91981,
        "sent": "a smiling woman wearing a black dress with a plaid bow on it . she is "
                "wearing ear rings and a watch"}
    # ref 4094 (one sentence), category 58.
    assert splits["test"][2] == {
        "tokens": ["a", "full", "hot", "-", "dog", "in", "front", "of", "two", "others"],
        "image_id": 406230, "file_name": "COCO_train2014_000000406230.jpg", "split": "test",
        "bbox": [194.82, 259.28, 349.26, 173.72], "name": "hot dog", "height": 433,
        "width": 640, "ref_id": 4094, "sent_id": 93873,
        "sent": "a full hot - dog in front of two others"}
    # ref 8520, second sentence: the last entry of val.
    assert splits["val"][-1] == {
        "tokens": ["weiner", "on", "the", "right"],
        "image_id": 527345, "file_name": "COCO_train2014_000000527345.jpg", "split": "val",
        "bbox": [342.44, 81.45, 272.62, 482.08], "name": "hot dog", "height": 640,
        "width": 640, "ref_id": 8520, "sent_id": 9102, "sent": "weiner on the right"}


def test_name_comes_from_the_annotation_category(splits):
    # "trail mix in a tray": ann 2109688 is category 51, a bowl.
    tray = [e for e in splits["test"] if e["ref_id"] == 2297]
    assert [e["name"] for e in tray] == ["bowl", "bowl"]
    assert {e["name"] for es in splits.values() for e in es} == {
        "person", "chair", "umbrella", "bear", "couch", "hot dog", "laptop", "bowl", "bird"}


def test_written_files_parse_and_round_trip(splits, tmp_path):
    sizes = write_splits(splits, tmp_path / "out")
    assert sizes == {"train": 9, "val": 10, "test": 9}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["test.json", "train.json", "val.json"]
    for split, entries in splits.items():
        assert json.loads((tmp_path / "out" / f"{split}.json").read_text()) == entries


def test_write_replaces_an_earlier_file(splits, tmp_path):
    (tmp_path / "val.json").write_text("stale")
    write_splits({"val": splits["val"]}, tmp_path)
    assert len(json.loads((tmp_path / "val.json").read_text())) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["val.json"]   # no temporary left over


def test_main_prints_sizes_and_writes(tmp_path, capsys):
    out = tmp_path / "vgd" / "refcocog"
    assert main(["--dataset", "refcocog", "--raw", str(REAL), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [line.split() for line in text.splitlines()]
    assert ["split", "refs", "sentences"] in lines
    for row in (["train", "5", "9"], ["val", "5", "10"], ["test", "5", "9"],
                ["total", "15", "28"]):
        assert row in lines
    assert str(out) in text
    assert len(json.loads((out / "test.json").read_text())) == 9


def test_main_default_out_is_datasets_vgd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "refcocog", "--raw", str(REAL)]) == 0
    assert (tmp_path / "datasets" / "vgd" / "refcocog" / "train.json").is_file()


def test_script_runs_and_fails_cleanly(tmp_path):
    ok = subprocess.run([sys.executable, "preprocess_vgd.py", "--dataset", "refcocog",
                         "--raw", str(REAL), "--out", str(tmp_path / "o")],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "total" in ok.stdout and "28" in ok.stdout
    bad = subprocess.run([sys.executable, "preprocess_vgd.py", "--dataset", "refcoco",
                          "--raw", str(REAL), "--out", str(tmp_path / "o2")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "refs(unc).p" in bad.stderr
    assert not (tmp_path / "o2").exists()


def test_python2_pickle_is_read_with_latin1(raw):
    """Python 2 pickles byte strings; a non-ASCII one fails the default ASCII decoding."""
    def edit(refs):
        refs[0]["sentences"][0]["raw"] = "café"
    edit_refs(raw, edit, protocol=2)                              # what Python 2 wrote
    data = (raw / REFS).read_bytes()
    utf8 = "café".encode()
    py3 = b"X" + len(utf8).to_bytes(4, "little") + utf8          # BINUNICODE
    py2 = b"U" + bytes([4]) + "café".encode("latin1")            # SHORT_BINSTRING
    assert data.count(py3) == 1
    (raw / REFS).write_bytes(data.replace(py3, py2))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads((raw / REFS).read_bytes())
    refs = load_refs(raw / REFS)
    assert refs[0]["sentences"][0]["raw"] == "café"
    assert len(refs) == 15


# --- errors --------------------------------------------------------------------------------

def test_wrong_refs_file_for_the_dataset():
    with pytest.raises(ReferError) as e:
        convert("refcoco", REAL)
    msg = str(e.value)
    assert "refcoco needs refs(unc).p" in msg and "found refs(umd).p" in msg
    assert "refcocog uses refs(umd).p" in msg


def test_no_refs_file_at_all(raw):
    (raw / REFS).unlink()
    with pytest.raises(ReferError, match=r"refcocog needs refs\(umd\)\.p, found no refs"):
        convert("refcocog", raw)


def test_raw_folder_missing(tmp_path):
    with pytest.raises(ReferError, match="does not exist"):
        convert("refcocog", tmp_path / "nowhere")


def test_unc_refs_given_for_refcocog(raw):
    def edit(refs):
        ref_by_id(refs, 33195)["split"] = "testA"
    edit_refs(raw, edit)
    with pytest.raises(ReferError) as e:
        convert("refcocog", raw)
    msg = str(e.value)
    assert REFS in msg and "ref_id 33195" in msg and "'testA'" in msg
    assert "['train', 'val', 'test']" in msg


def test_umd_refs_renamed_unc_for_refcoco(raw):
    edit_refs(raw, lambda refs: None, name="refs(unc).p")
    # the first ref whose split RefCOCO lacks is the third, 3729, in "test"
    with pytest.raises(ReferError) as e:
        convert("refcoco", raw)
    assert "ref_id 3729" in str(e.value) and "'test'" in str(e.value)
    assert "['train', 'val', 'testA', 'testB']" in str(e.value)


def test_ann_id_not_in_instances(raw):
    edit_refs(raw, lambda refs: ref_by_id(refs, 8061).update(ann_id=999999999))
    with pytest.raises(ReferError) as e:
        convert("refcocog", raw)
    msg = str(e.value)
    assert "ref_id 8061" in msg and "ann_id 999999999" in msg and "instances.json" in msg


def test_image_id_not_in_instances(raw):
    edit_refs(raw, lambda refs: ref_by_id(refs, 24026).update(image_id=424242))
    with pytest.raises(ReferError) as e:
        convert("refcocog", raw)
    msg = str(e.value)
    assert "ref_id 24026" in msg and "image_id 424242" in msg and "instances.json" in msg


def test_annotation_of_another_image(raw):
    # ann 251837 is on image 122469; pretend the ref points at image 133436.
    edit_refs(raw, lambda refs: ref_by_id(refs, 40373).update(image_id=133436))
    with pytest.raises(ReferError, match="ref_id 40373: ann_id 251837 belongs to image 122469"):
        convert("refcocog", raw)


@pytest.mark.parametrize("bbox", [[100.0, 78.25, 329.23, 405.6],    # x + w > width + 1
                                  [2.04, 100.0, 329.23, 405.6],     # y + h > height + 1
                                  [-3.0, 78.25, 329.23, 405.6],     # x < 0
                                  [2.04, -0.5, 329.23, 405.6],      # y < 0
                                  [2.04, 78.25, 0.0, 405.6],        # w = 0
                                  [2.04, 78.25, 329.23, -1.0]])     # h < 0
def test_bbox_outside_its_image(raw, bbox):
    def edit(coco):
        next(a for a in coco["annotations"] if a["id"] == 251837)["bbox"] = bbox
    edit_instances(raw, edit)
    with pytest.raises(ReferError) as e:
        convert("refcocog", raw)
    msg = str(e.value)
    assert "ref_id 40373" in msg and str(bbox) in msg and "334x500" in msg


def test_bbox_on_the_one_pixel_border_is_accepted(raw):
    def edit(coco):
        next(a for a in coco["annotations"] if a["id"] == 251837)["bbox"] = [0, 0, 335, 501]
    edit_instances(raw, edit)
    assert convert("refcocog", raw)["train"][0]["bbox"] == [0.0, 0.0, 335.0, 501.0]


def test_instances_missing(raw):
    (raw / "instances.json").unlink()
    with pytest.raises(ReferError, match=r"instances file .*instances\.json does not exist"):
        convert("refcocog", raw)


def test_instances_not_json(raw):
    (raw / "instances.json").write_text('{"images": [')
    with pytest.raises(ReferError, match=r"instances\.json: not a valid JSON"):
        convert("refcocog", raw)


def test_instances_not_coco(raw):
    (raw / "instances.json").write_text('{"images": []}')
    with pytest.raises(ReferError, match="'annotations'"):
        convert("refcocog", raw)


def test_refs_not_a_list(raw):
    (raw / REFS).write_bytes(pickle.dumps({"refs": []}))
    with pytest.raises(ReferError, match=r"refs\(umd\)\.p: expected a list of refs, got dict"):
        convert("refcocog", raw)


def test_refs_list_of_non_refs(raw):
    (raw / REFS).write_bytes(pickle.dumps(["a", "b"]))
    with pytest.raises(ReferError, match=r"ref \[0\] is a str"):
        load_refs(raw / REFS)


def test_ref_missing_keys(raw):
    edit_refs(raw, lambda refs: refs[3].pop("ann_id"))
    with pytest.raises(ReferError, match=r"ref \[3\] \(ref_id 8061\) lacks \['ann_id'\]"):
        load_refs(raw / REFS)


def test_refs_not_a_pickle(raw):
    shutil.copy(raw / "instances.json", raw / REFS)
    with pytest.raises(ReferError, match=r"refs\(umd\)\.p: not a readable refs pickle"):
        load_refs(raw / REFS)


def test_main_reports_errors_without_traceback(raw, tmp_path, capsys):
    edit_refs(raw, lambda refs: ref_by_id(refs, 8061).update(ann_id=999999999))
    assert main(["--dataset", "refcocog", "--raw", str(raw), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ref_id 8061" in err
    assert not (tmp_path / "o").exists()


class RunsShell:
    """What a hostile refs file holds: unpickling it calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def hostile_refs(raw: Path) -> Path:
    marker = raw / "owned"
    refs = pickle.loads((raw / "refs(umd).p").read_bytes())
    refs[0]["sentences"][0]["raw"] = RunsShell(f"touch {marker}")
    (raw / "refs(umd).p").write_bytes(pickle.dumps(refs, protocol=2))
    return marker


def no_utf8_instances(raw: Path) -> int:
    return latin1_into(raw / "instances.json", '"images"')


REFS_CASES = [
    ("pickle calling os.system", hostile_refs,
     ["refs(umd).p: refused to load the global posix.system", "is this the refer toolkit's"]),
    ("truncated pickle",
     lambda raw: (raw / "refs(umd).p").write_bytes((raw / "refs(umd).p").read_bytes()[:3000]),
     ["refs(umd).p: not a readable refs pickle (UnpicklingError: "]),
    ("zero-byte pickle", lambda raw: (raw / "refs(umd).p").write_bytes(b""),
     ["refs(umd).p: not a readable refs pickle (EOFError: "]),
    ("non-UTF-8 instances.json", no_utf8_instances,
     ["instances.json: not UTF-8 text: byte 0xe9 at byte offset {result:,} (line "]),
]


@pytest.mark.parametrize("name, make, words", REFS_CASES, ids=[c[0] for c in REFS_CASES])
def test_broken_refer_input_fails_preprocessing(raw, tmp_path, capsys, name, make, words):
    result = make(raw)
    out = tmp_path / "out"
    assert refer.main(["--dataset", "refcocog", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {raw}") and err.count("\n") == 1, err
    for w in words:
        assert w.format(result=result) in err, err
    assert not out.exists()
    if isinstance(result, Path):                 # the hostile pickle's command never ran
        assert not result.exists()


def test_python2_protocol0_refs_with_a_set_still_load(raw):
    """Python 2's default protocol 0 writes a set as the global __builtin__.set: allowed."""
    refs = pickle.loads((raw / "refs(umd).p").read_bytes())
    refs[0]["tags"] = {"a"}
    data = pickle.dumps(refs, protocol=0, fix_imports=True)
    assert b"c__builtin__\nset" in data
    (raw / "refs(umd).p").write_bytes(data)
    loaded = refer.load_refs(raw / "refs(umd).p")
    assert loaded[0]["tags"] == {"a"} and len(loaded) == 15


def test_refs_file_with_an_empty_split_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("instances.json", "refs(umd).p"):
        shutil.copyfile(REAL / name, raw / name)
    edit_refs(raw, lambda refs: [r.update(split="train") for r in refs if r["split"] == "val"])
    out = tmp_path / "out"
    assert main(["--dataset", "refcocog", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{raw / 'refs(umd).p'}: no ref in split 'val'" in err
    assert "expected refs in every split of refcocog" in err
    assert "train 10, val 0, test 5" in err
    assert not out.exists()                             # no split file written
