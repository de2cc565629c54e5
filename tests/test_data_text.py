"""Vocabularies and token ids are the original's, on real data; checkpoints record them.

Expected values were worked out from the original's rules (MILVLG/mmnas,
``mmnas/loader/load_data_{vgd,vqa,itm}.py``), not from this project's code:
PAD = 0, UNK = 1, CLS = 2, then every word in first-seen order over the corpus files in the
original's order; a text's ids are its first MAX_TOKEN words, padded with PAD.
- RefCOCO*: the refer toolkit's ``tokens`` exactly as given ('.', ',', '-', '/' are words),
  corpus: every split file (RefCOCOg: train, val, test).
- VQA questions and Flickr30K captions: lower-case, delete . , ' ! ? " ( ) * # : ;, turn
  - and / into spaces, split on white space.
"""
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_npz

from core.config import resolve
from core.tasks.vgd.refer import convert, write_splits
from core.data.text import files_stamp
from core.loop import check_vocabularies
from core.tasks.itm import ITMTask
from core.tasks.vgd import VGDTask
from utils.checkpoint import CheckpointError

DATA = Path(__file__).resolve().parent / "data"

# The 28 sentences of tests/data/refcocog, split files train, val, test, each in refs order.
REFCOCOG_WORDS = [
    "PAD", "UNK", "CLS", "a", "smiling", "woman", "wearing", "black", "dress", "with",
    "plaid", "bow", "on", "it", ".", "she", "is", "ear", "rings", "and", "watch", "person",
    "sitting", "at", "table", "behind", "sandwich", "navy", "hoodie", "the", "neck", "chest",
    "of", "purple", "hooded", "sweatshirt", "chair", "which", "above", "dog", "bus", "seat",
    "over", "umbrella", "leftside", "baby", "polar", "bear", "sleeping", "another", "sofa",
    "pink", "white", "stripes", "/", "off", "-", "pillow", "striped", "soft", "pastel",
    "brown", "red", "floral", "rug", "baseball", "player", "in", "batting", "helmet",
    "about", "to", "run", "ball", "running", "right", "laptop", "beer", "bottle", "blank",
    "screen", "sausage", "top", "beans", "french", "fries", "weiner", "male", "buzzed",
    "haircut", "colorado", "long", "sleve", "shirt", "man", "blue", "jeans", "that", "has",
    "number", "8", "full", "hot", "front", "two", "others", "bandanna", "her", "head",
    "chef", "bandana", "trail", "mix", "tray", "next", "fruits", "vegetables", "pebbles",
    "are", "stored", "pigeon", "looking", "down", ",", "left", "other", "pigeons", "dove",
    "near", "doves"]

# (split, position in the split file, sent_id, ids of the first 14 tokens, PAD after)
REFCOCOG_IDS = [
    # 22 tokens, cut after 14: a smiling woman wearing a black dress with a plaid bow on it .
    ("train", 0, 91981, [3, 4, 5, 6, 3, 7, 8, 9, 3, 10, 11, 12, 13, 14]),
    # the chair which is above the dog
    ("train", 4, 7892, [29, 36, 37, 16, 38, 29, 39, 0, 0, 0, 0, 0, 0, 0]),
    # a sofa with pink and white stripes with a white / off - white | pillow (cut)
    ("val", 0, 4747, [3, 50, 9, 51, 19, 52, 53, 9, 3, 52, 54, 55, 56, 52]),
    # a full hot - dog in front of two others
    ("test", 2, 93873, [3, 101, 102, 56, 39, 67, 103, 32, 104, 105, 0, 0, 0, 0]),
    # a pigeon looking down , to the left of two other pigeons
    ("test", 7, 30645, [3, 120, 121, 122, 123, 71, 29, 124, 32, 104, 125, 126, 0, 0]),
]


def _vgd_task(root: Path) -> VGDTask:
    cfg = resolve("vgd", "train", {"DATASET": "refcocog", "DATA_ROOT": str(root),
                                   "WORD_VECTORS": "hash", "MAX_REGIONS": 4})
    return VGDTask(cfg, log=lambda line: None)


@pytest.fixture(scope="module")
def refcocog(tmp_path_factory):
    """The real RefCOCOg sample converted by preprocess_vgd's code, 4-box features."""
    root = tmp_path_factory.mktemp("vgd")
    splits = convert("refcocog", DATA / "refcocog")
    write_splits(splits, root / "vgd" / "refcocog")
    for iid in {e["image_id"] for es in splits.values() for e in es}:
        write_npz(root / "vgd" / "feats" / f"COCO_train2014_{iid:012d}.jpg.npz", 4,
                          seed=iid, height=1000, width=1000)
    task = _vgd_task(root)
    task.prepare()
    return task


def test_refcocog_vocabulary_is_the_originals(refcocog):
    assert len(REFCOCOG_WORDS) == 130        # re-tokenising the joined tokens gave 126
    assert refcocog.vocab == {w: i for i, w in enumerate(REFCOCOG_WORDS)}


def test_refcocog_token_ids_are_the_originals(refcocog):
    for split, pos, sent_id, ids in REFCOCOG_IDS:
        item = refcocog.dataset(split)[pos]
        assert item["sent_id"] == sent_id
        assert item["txt"].tolist() == ids, sent_id


def test_refcocog_vocabulary_cache_of_the_old_rule_is_not_read(refcocog):
    """A vocabulary cached by the old rule (tokens joined and re-tokenised), under the
    same data files, must not come back."""
    root = Path(refcocog.cfg.DATA_ROOT)
    folder = root / "vgd" / "refcocog"
    cache = folder / "cache"
    assert [p.name.startswith("vocab_tokens-") for p in cache.glob("vocab_*.json")] == [True]
    stamp = files_stamp([folder / f"{s}.json" for s in ("train", "val", "test")])
    stale = cache / f"vocab_{stamp}.json"
    stale.write_text(json.dumps({"PAD": 0, "UNK": 1, "CLS": 2, "a": 3}))
    again = _vgd_task(root)
    again.prepare()
    assert len(again.vocab) == 130
    stale.unlink()


def test_refcocog_tokens_that_are_not_words_are_named(tmp_path):
    splits = convert("refcocog", DATA / "refcocog")
    splits["train"][1]["tokens"] = ["a", 5]
    write_splits(splits, tmp_path / "vgd" / "refcocog")
    with pytest.raises(ValueError, match=r"train.json: \[1\].tokens is \['a', 5\], expected a "
                                         r"list of words \(strings\)"):
        _vgd_task(tmp_path).prepare()


# --------------------------------------------------------------------------- VQA


# The real val sample's 100 questions are the whole corpus here (221 entries with PAD, UNK,
# CLS); question index in the file -> (question, words, ids)
VQA_IDS = {
    8: ("How many photo's can you see?", ["how", "many", "photos", "can", "you", "see"],
        [30, 31, 32, 33, 34, 35]),
    43: ("Could this be a multi-purpose room?",
         ["could", "this", "be", "a", "multi", "purpose", "room"], [89, 20, 90, 21, 107, 108, 76]),
    69: ("What color is the Salisbury Rd. sign?",
         ["what", "color", "is", "the", "salisbury", "rd", "sign"], [7, 52, 4, 9, 163, 164, 165]),
    # 17 words, cut after 14 ("black clad snowboarder" ends at "black")
    91: ("Does this appear to be a photo of multiple exposures of the black clad snowboarder?",
         ["does", "this", "appear", "to", "be", "a", "photo", "of", "multiple", "exposures",
          "of", "the", "black", "clad"],
         [36, 20, 202, 26, 90, 21, 94, 16, 203, 204, 16, 9, 205, 206]),
}


def test_vqa_vocabulary_and_ids_are_the_originals(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    task = vqa_task(root)
    task.prepare()
    assert len(task.vocab) == 221
    data = task.dataset("val")
    for i, (question, words, ids) in VQA_IDS.items():
        assert data.entries[i]["question"] == question
        assert [task.vocab[w] for w in words] == ids
        assert data[i]["txt"].tolist() == ids + [0] * (14 - len(ids)), question


# --------------------------------------------------------------------------- ITM


@pytest.fixture
def flickr_root(tmp_path, npz_writer):
    """The real dev and test captions (no train captions here), features of 3 dev images."""
    precomp = tmp_path / "itm" / "f30k_precomp"
    shutil.copytree(DATA / "flickr30k" / "f30k_precomp", precomp)
    shutil.copyfile(DATA / "flickr30k" / "id_mapping.json", tmp_path / "itm" / "id_mapping.json")
    (precomp / "train_ids.txt").unlink()
    mapping = json.loads((DATA / "flickr30k" / "id_mapping.json").read_text())
    ids = (precomp / "dev_ids.txt").read_text().split()[::5][:3]
    for iid in ids:
        npz_writer(tmp_path / "itm" / "feats" / f"{mapping[iid]}.npz", 4, seed=int(iid))
    return tmp_path


def test_itm_vocabulary_and_ids_are_the_originals(flickr_root):
    cfg = resolve("itm", "train", {"DATA_ROOT": str(flickr_root), "WORD_VECTORS": "hash",
                                   "MAX_REGIONS": 4, "SUBSET": 3})
    task = ITMTask(cfg, log=lambda line: None)
    task.prepare()
    assert len(task.vocab) == 5916          # dev then test captions
    assert list(task.vocab)[:12] == ["PAD", "UNK", "CLS", "a", "group", "of", "people",
                                     "stand", "in", "the", "back", "truck"]
    data = task.dataset("dev")
    expected = {
        # "A long-haired man sleeping on a couch"
        9: [3, 50, 51, 44, 38, 18, 3, 39],
        # "Boy in brown shirt with headphones on sits on woman 's shoulders in a crowd ."
        10: [52, 8, 53, 35, 13, 54, 18, 55, 18, 40, 56, 57, 8, 3, 58],
    }
    words = {9: "a long haired man sleeping on a couch",
             10: "boy in brown shirt with headphones on sits on woman s shoulders in a crowd"}
    for j, ids in expected.items():
        assert [task.vocab[w] for w in words[j].split()] == ids
        assert data.tokens[j].tolist() == ids + [0] * (50 - len(ids))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_records_the_words_in_index_order(refcocog):
    meta = refcocog.model_meta()
    assert meta["vocab_size"] == 130 and meta["vocab"] == REFCOCOG_WORDS


def _meta(words, answers=None):
    meta = {"vocab_size": len(words), "vocab": list(words)}
    if answers is not None:
        meta.update(answer_size=len(answers), answers=list(answers))
    return meta


def test_same_vocabulary_loads_and_reordered_one_is_refused():
    words = ["PAD", "UNK", "CLS", "red", "cube", "left"]
    assert check_vocabularies({"meta": _meta(words)}, _meta(words), "a.pkl") == ""
    swapped = ["PAD", "UNK", "CLS", "cube", "red", "left"]
    with pytest.raises(CheckpointError, match=r"^a.pkl: its word vocabulary differs from the "
                                              r"data's at index 3: checkpoint 'cube', data 'red'"):
        check_vocabularies({"meta": _meta(swapped)}, _meta(words), "a.pkl")
    with pytest.raises(CheckpointError, match=r"^a.pkl: its word vocabulary has 5 entries, the "
                                              r"data's has 6"):
        check_vocabularies({"meta": _meta(words[:5])}, _meta(words), "a.pkl")


def test_answer_vocabulary_is_checked_too():
    words = ["PAD", "UNK", "CLS", "what"]
    data = _meta(words, ["yes", "no", "2"])
    with pytest.raises(CheckpointError, match=r"answer vocabulary differs from the data's at "
                                              r"index 0: checkpoint 'no', data 'yes'"):
        check_vocabularies({"meta": _meta(words, ["no", "yes", "2"])}, data, "b.pkl")


def test_checkpoint_without_words_checks_sizes_and_says_so():
    words = ["PAD", "UNK", "CLS", "what"]
    # the original's released files: no meta at all; the tensor shapes are checked later
    note = check_vocabularies({"state_dict": {}}, _meta(words, ["yes"]), "released.pkl")
    assert note == ("note: released.pkl records no word vocabulary or answer vocabulary (a "
                    "released or older checkpoint): rebuilt from the data the original's way, "
                    "only sizes are checked")
    # an older checkpoint of ours: sizes only
    with pytest.raises(CheckpointError, match="its word vocabulary has 9 entries, the data's "
                                              "has 4"):
        check_vocabularies({"meta": {"vocab_size": 9}}, _meta(words), "old.pkl")
    assert check_vocabularies({"meta": {"vocab_size": 4}}, _meta(words), "old.pkl") \
        .startswith("note: old.pkl records no word vocabulary (")


@pytest.mark.parametrize("content, words", [
    (b"the 0.1 0.2 0.3\ncat 0.1 oops 0.3\n", "line 2 ('cat'): expected 3 numbers"),
    (b"the 0.1 0.2 0.3\ncat 0.1 0.2\n", "line 2 ('cat'): 2 numbers, expected 3"),
    (b"the 0.1 0.2 0.3\nch\xe2t 0.1 0.2 0.3\n", "line 2: not UTF-8 text (invalid continuation byte at column 3)"),
])
def test_broken_glove_file_names_file_and_line(tmp_path, content, words):
    from core.data.text import word_vectors
    glove = tmp_path / "glove.txt"
    glove.write_bytes(content)
    with pytest.raises(ValueError) as e:
        word_vectors(f"glove:{glove}", ["the", "cat"], dim=3)
    assert str(glove) in str(e.value) and words in str(e.value)
