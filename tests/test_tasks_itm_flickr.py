"""Flickr30K f30k_precomp parsing, on the real files in tests/data (copied before breaking)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import NOT_UTF8
from core.tasks.itm.flickr import (CaptionSplit, feature_key, file_names, read_id_mapping, read_ids,
                              read_split)

DATA = Path(__file__).resolve().parent / "data"
REAL = DATA / "flickr30k"
PRECOMP = REAL / "f30k_precomp"
MAPPING = REAL / "id_mapping.json"

# The first image of test_caps.txt / test_ids.txt (lines 1-5), written out from the file.
TEST_FIRST_ID = 25
TEST_FIRST_CAPTIONS = [
    "The man with pierced ears is wearing glasses and an orange hat .",
    "A man with glasses is wearing a beer can crocheted hat .",
    "A man with gauges and glasses is wearing a Blitz hat .",
    "A man in an orange hat starring at something .",
    "A man wears an orange hat and glasses .",
]


@pytest.fixture
def precomp(tmp_path):
    """A writable copy of the real test/dev caption and id files."""
    out = tmp_path / "f30k_precomp"
    out.mkdir()
    for name in ("test_caps.txt", "test_ids.txt", "dev_caps.txt", "dev_ids.txt"):
        shutil.copyfile(PRECOMP / name, out / name)
    return out


def lines_of(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1]


def write_lines(path: Path, lines: list[str], end: str = "\n") -> None:
    path.write_bytes("".join(line + end for line in lines).encode("utf-8"))


def edit_line(path: Path, line_no: int, text: str) -> None:
    lines = lines_of(path)
    lines[line_no - 1] = text
    write_lines(path, lines)


# ---- the real files ---------------------------------------------------------------------

def test_real_test_split():
    split = read_split(PRECOMP, "test")
    assert (len(split.image_ids), len(split.captions)) == (1000, 5000)
    assert split.image_ids[:3] == [TEST_FIRST_ID, 34, 51]
    assert split.image_ids[-1] == 30943
    assert split.captions[:5] == TEST_FIRST_CAPTIONS
    assert split.captions[5] == ("A black and white dog is running in a grassy garden "
                                 "surrounded by a white fence .")
    assert split.caption_image.dtype == np.int64
    assert split.caption_image.tolist() == np.repeat(np.arange(1000), 5).tolist()
    assert split.ids_file == PRECOMP / "test_ids.txt"


def test_real_dev_split_and_its_utf8_caption():
    split = read_split(PRECOMP, "dev")
    assert (len(split.image_ids), len(split.captions)) == (1014, 5070)
    assert split.image_ids[:2] == [67, 99] and split.image_ids[-1] == 30999
    assert split.captions[0] == ("A group of people stand in the back of a truck filled "
                                 "with cotton .")
    # line 122 is the one non-ASCII caption of the real files (a curly apostrophe)
    assert split.captions[121] == "Two Rubbish men standing on they\u2019re truck loading trash ."


def test_real_id_mapping_and_feature_keys():
    mapping = read_id_mapping(MAPPING)
    assert len(mapping) == 31014 and sorted(mapping) == list(range(31014))
    assert mapping[0] == "1000092795.jpg"
    names = file_names(read_split(PRECOMP, "test"), mapping)
    assert names[:2] == ["1007129816.jpg", "1009434119.jpg"] == [mapping[25], mapping[34]]
    assert feature_key(names[0]) == 1007129816
    assert feature_key("1000092795.jpg") == 1000092795
    keys = {feature_key(name) for name in mapping.values()}
    assert len(keys) == 31014 and max(keys) == 8251604257     # > int32: keep int64


def test_real_train_ids_are_per_image_and_the_splits_partition_the_mapping():
    train = read_ids(PRECOMP / "train_ids.txt")
    assert len(train) == 29000 and train[:5] == [0, 1, 2, 3, 4]
    dev, test = read_split(PRECOMP, "dev").image_ids, read_split(PRECOMP, "test").image_ids
    everything = set(train) | set(dev) | set(test)
    assert len(everything) == 29000 + 1014 + 1000
    assert everything == set(read_id_mapping(MAPPING))


def test_train_split_with_generated_captions(tmp_path):
    shutil.copyfile(PRECOMP / "train_ids.txt", tmp_path / "train_ids.txt")
    write_lines(tmp_path / "train_caps.txt", [f"caption {k} of image {n}"
                                              for n in range(29000) for k in range(5)])
    split = read_split(tmp_path, "train")
    assert len(split.image_ids) == 29000 and len(split.captions) == 145000
    assert split.captions[7] == "caption 2 of image 1" and split.caption_image[7] == 1


def test_per_image_ids_form_reads_the_same(precomp):
    ids = lines_of(precomp / "test_ids.txt")[::5]
    write_lines(precomp / "test_ids.txt", ids)
    split = read_split(precomp, "test")
    assert split.image_ids == read_split(PRECOMP, "test").image_ids


def test_trailing_empty_lines_and_crlf_are_tolerated(precomp):
    for name in ("test_caps.txt", "test_ids.txt"):
        write_lines(precomp / name, lines_of(precomp / name) + ["", ""], end="\r\n")
    split = read_split(precomp, "test")
    assert split.captions[:5] == TEST_FIRST_CAPTIONS
    assert len(split.image_ids) == 1000


def test_karpathy_dataset_json_gives_the_same_mapping(tmp_path):
    mapping = read_id_mapping(MAPPING)
    images = [{"imgid": iid, "filename": name, "split": "test", "sentences": []}
              for iid, name in list(mapping.items())[:50]]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    assert read_id_mapping(path) == dict(list(mapping.items())[:50])


# ---- errors, on broken copies -------------------------------------------------------------

def test_caption_count_mismatch(precomp):
    write_lines(precomp / "test_caps.txt", lines_of(precomp / "test_caps.txt")[:-1])
    with pytest.raises(ValueError, match="test_caps.txt has 4,999 lines; expected 5 × 1,000 = "
                       r"5,000 \(five captions per image, test_ids.txt lists 1,000 images\)"):
        read_split(precomp, "test")


def test_per_caption_ids_not_a_multiple_of_five(precomp):
    for name in ("test_caps.txt", "test_ids.txt"):
        write_lines(precomp / name, lines_of(precomp / name)[:-1])
    with pytest.raises(ValueError, match="test_ids.txt has 4,999 lines, one id per caption "
                       "line, which is not a multiple of 5"):
        read_split(precomp, "test")


def test_id_changing_inside_an_image(precomp):
    edit_line(precomp / "test_ids.txt", 7, "25")          # lines 6-10 are image 1 (id 34)
    with pytest.raises(ValueError, match="test_ids.txt line 7: id 25, but line 6 has 34; "
                       "lines 6-10 are the 5 captions of image 1"):
        read_split(precomp, "test")


def test_image_listed_twice(precomp):
    for n in range(6, 11):
        edit_line(precomp / "test_ids.txt", n, "25")
    with pytest.raises(ValueError, match=r"test_ids.txt line 6: imgid 25 is listed again "
                       r"\(first on line 1\)"):
        read_split(precomp, "test")


@pytest.mark.parametrize("bad", ["25a", "-25", "2.5", ""])
def test_non_integer_id(precomp, bad):
    edit_line(precomp / "test_ids.txt", 3, bad)
    with pytest.raises(ValueError, match=f"test_ids.txt line 3: '{bad}' is not an image id"):
        read_split(precomp, "test")


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_caption_in_the_middle(precomp, blank):
    edit_line(precomp / "test_caps.txt", 3, blank)
    with pytest.raises(ValueError, match="test_caps.txt line 3 is blank; expected a caption"):
        read_split(precomp, "test")


@pytest.mark.parametrize("name", ["test_caps.txt", "test_ids.txt"])
def test_missing_file(precomp, name):
    (precomp / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        read_split(precomp, "test")


def test_empty_ids_and_unknown_split(precomp):
    (precomp / "test_ids.txt").write_text("\n")
    with pytest.raises(ValueError, match="test_ids.txt is empty"):
        read_split(precomp, "test")
    with pytest.raises(ValueError, match="unknown Flickr30K split 'val'"):
        read_split(precomp, "val")


def test_imgid_missing_from_mapping():
    mapping = read_id_mapping(MAPPING)
    del mapping[34]
    with pytest.raises(ValueError, match=r"test_ids.txt: image 1 has imgid 34, which the id "
                       r"mapping \(31,013 entries\) does not list"):
        file_names(read_split(PRECOMP, "test"), mapping)
    bare = CaptionSplit(["a"], np.array([0]), [7])
    with pytest.raises(ValueError, match="the split: image 0 has imgid 7"):
        file_names(bare, {})


@pytest.mark.parametrize("content, message", [
    ({"x1": "a.jpg"}, "key 'x1' is not a"),
    ({"1": 5}, "imgid 1 maps to 5, expected an image file name"),
    ({"images": [{"imgid": 1}]}, r"images\[0\].filename is missing"),
    ({"images": [{"imgid": 1, "filename": "a.jpg"}, {"imgid": 1, "filename": "b.jpg"}]},
     r"images\[1\].imgid 1 is a duplicate"),
    ([1, 2], "a JSON list, expected an object"),
])
def test_bad_mapping_files(tmp_path, content, message):
    path = tmp_path / "id_mapping.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_id_mapping(path)


def test_missing_mapping_and_bad_file_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="id_mapping.json"):
        read_id_mapping(tmp_path / "id_mapping.json")
    with pytest.raises(ValueError, match="'cat.jpg' has no number"):
        feature_key("cat.jpg")


def test_non_utf8_caption_file_names_offset_and_line(tmp_path):
    precomp = tmp_path / "f30k_precomp"
    shutil.copytree(DATA / "flickr30k" / "f30k_precomp", precomp)
    path = precomp / "test_caps.txt"
    lines = path.read_bytes().split(b"\n")
    lines[2] = NOT_UTF8
    path.write_bytes(b"\n".join(lines))
    offset = len(lines[0]) + len(lines[1]) + 2 + NOT_UTF8.index(b"\xe9")
    with pytest.raises(ValueError) as e:
        read_split(precomp, "test")
    assert str(e.value) == (f"{path}: not UTF-8 text: byte 0xe9 at byte offset {offset:,} "
                            f"(line 3): invalid continuation byte; save the file as UTF-8")
