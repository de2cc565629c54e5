"""The VQA loader on the real VQA-v2 sample files (100 val questions over 19 COCO images)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import core.data.text as text_mod
from conftest import (VAL_ANNOTATIONS as AFILE, VAL_QUESTIONS as QFILE, assert_nothing_saved,
                      latin1_into, script_error)
from core.data.features import pad_regions
from core.data.npz import image_id_of
from core.data.text import CLS, PAD, UNK, build_vocab, encode, tokenize
from core.tasks.vqa import QUESTIONS, soft_score

REPO = Path(__file__).resolve().parents[1]
REAL_VQA = Path(__file__).resolve().parent / "data" / "vqa"
SHIPPED_DICT = REPO / "core" / "data" / "vqa_answer_dict.json"


@pytest.fixture
def prepared(vqa_val_root, vqa_task):
    root, feats = vqa_val_root
    task = vqa_task(root)
    task.prepare()
    return task, root, feats


def _item(ds, qid):
    idx = next(i for i, e in enumerate(ds.entries) if e["question_id"] == qid)
    return ds[idx]


# --------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("text, tokens", [
    ("Where is he looking?", ["where", "is", "he", "looking"]),
    ("What's the man's T-shirt color?", ["whats", "the", "mans", "t", "shirt", "color"]),
    ("Is it 1/2 (half) a pizza; or not: yes!", ["is", "it", "1", "2", "half", "a", "pizza",
                                                 "or", "not", "yes"]),
    ('"Quoted" *stars* #tag, 3.5 oz.', ["quoted", "stars", "tag", "35", "oz"]),
    ("salt & pepper @ 10%", ["salt", "&", "pepper", "@", "10%"]),   # only the listed are cut
    ("  two   spaces\tand\ttabs\n", ["two", "spaces", "and", "tabs"]),
    ("well-known--x/y//z", ["well", "known", "x", "y", "z"]),
    ("?!.", []),
])
def test_tokenize_rules(text, tokens):
    assert tokenize(text) == tokens


def test_build_vocab_and_encode():
    vocab = build_vocab(["Is it red?", "Is the cube-red big?"])
    assert vocab == {"PAD": 0, "UNK": 1, "CLS": 2, "is": 3, "it": 4, "red": 5, "the": 6,
                     "cube": 7, "big": 8}
    assert (PAD, UNK, CLS) == (0, 1, 2)
    ids = encode("Is the ball red?", vocab, 6)
    assert ids.dtype == np.int64 and ids.tolist() == [3, 6, UNK, 5, 0, 0]
    assert encode("is it red is it red", vocab, 4).tolist() == [3, 4, 5, 3]   # cut
    assert encode("", vocab, 3).tolist() == [0, 0, 0]


def test_image_id_of_feature_names():
    assert image_id_of("COCO_val2014_000000262148.jpg.npz") == 262148
    assert image_id_of("COCO_train2014_000000000009.jpg.npz") == 9
    assert image_id_of("COCO_val2014_000000262148.jpg") is None
    assert image_id_of("notes.npz") is None


def test_soft_score_table():
    assert [soft_score(c) for c in range(7)] == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1, 1])


# --------------------------------------------------------------------------- real val split


def test_val_split_has_100_samples_with_real_vocab(prepared):
    task, root, _ = prepared
    ds = task.dataset("val")
    assert len(ds) == 100
    real = json.loads((REAL_VQA / QUESTIONS["val"]).read_text())["questions"]
    assert [e["question_id"] for e in ds.entries] == [q["question_id"] for q in real]
    # vocabulary: PAD, UNK, CLS, then first-seen words of the (only) corpus file
    assert list(task.vocab)[:3] == ["PAD", "UNK", "CLS"]
    assert [task.vocab[w] for w in ("where", "is", "he", "looking")] == [3, 4, 5, 6]
    assert [task.vocab[w] for w in ("what", "are", "the", "people", "in", "background",
                                    "doing")] == list(range(7, 14))
    assert sorted(task.vocab.values()) == list(range(len(task.vocab)))
    words = {w for q in real for w in tokenize(q["question"])}
    assert len(task.vocab) == 3 + len(words)
    assert task.word_vectors.shape == (len(task.vocab), 300)
    assert task.word_vectors.dtype == np.float32
    np.testing.assert_array_equal(task.word_vectors[task.vocab["where"]],
                                  text_mod.hash_vector("where"))
    item = ds[0]
    assert item["qid"] == 262148000
    assert item["txt"].tolist() == [3, 4, 5, 6] + [0] * 10
    assert _item(ds, 262148002)["txt"].tolist() == [7, 4, 5, 14, 15, 16] + [0] * 8
    # a checkpoint records both vocabularies, words in index order
    assert task.model_meta() == {"vocab_size": len(task.vocab), "vocab": list(task.vocab),
                                 "answer_size": 3129, "answers": task.ix_to_ans}
    assert task.model_meta()["answers"][:3] == ["net", "pitcher", "orange"]
    # the note that the vocabulary lacks the other corpus files
    assert any(line.startswith("note: vocabulary built from") for line in task.lines)


def test_soft_score_target_of_question_262148000(prepared):
    task, _, _ = prepared
    ds = task.dataset("val")
    batch = task.collate([ds[0]])
    target = batch["target"]
    assert target.shape == (1, 3129) and target.dtype == torch.float32
    ix = task.ans_to_ix
    # 7 x down, at table, skateboard, table -- all four are in the released dictionary
    assert target[0, ix["down"]].item() == pytest.approx(1.0)
    assert target[0, ix["table"]].item() == pytest.approx(0.3)
    assert target[0, ix["at table"]].item() == pytest.approx(0.3)
    assert target[0, ix["skateboard"]].item() == pytest.approx(0.3)
    assert int((target != 0).sum()) == 4
    assert target.sum().item() == pytest.approx(1.9)


def test_answers_outside_the_dictionary_are_dropped(prepared):
    task, _, _ = prepared
    ds = task.dataset("val")
    for i in range(len(ds)):
        item = ds[i]
        answers = ds.entries[i]["answers"]
        assert len(answers) == 10
        assert len(item["ans_idx"]) == len(item["ans_score"]) <= 10
        assert all(0 < s <= 1 for s in item["ans_score"])
    # every sample's target mass is at most 1 per distinct in-dictionary answer
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert batch["target"].shape == (100, 3129)
    assert float(batch["target"].max()) == 1.0


def test_features_both_layouts_and_collate_padding(prepared):
    task, _, feats = prepared
    ds = task.dataset("val")
    a = _item(ds, 262148000)               # image 262148: x stored [K, 2048]
    iid_b = next(e["image_id"] for e in ds.entries if e["image_id"] != 262148)
    b = ds[next(i for i, e in enumerate(ds.entries) if e["image_id"] == iid_b)]
    xa, ba = feats[262148]
    xb, bb = feats[iid_b]                  # stored [2048, K]
    assert len(xa) != len(xb)
    np.testing.assert_array_equal(a["img"], xa)
    np.testing.assert_array_equal(a["boxes"], ba)
    np.testing.assert_array_equal(b["img"], xb)
    np.testing.assert_array_equal(b["boxes"], bb)
    assert a["img"].dtype == np.float32 and a["img"].flags["C_CONTIGUOUS"]
    batch = task.collate([a, b])
    kmax = max(len(xa), len(xb))
    assert batch["img"].shape == (2, kmax, 2048) and batch["boxes"].shape == (2, kmax, 4)
    assert batch["txt"].shape == (2, 14) and batch["txt"].dtype == torch.int64
    assert batch["qid"] == [262148000, b["qid"]]
    for row, (x, bx) in enumerate([(xa, ba), (xb, bb)]):
        k = len(x)
        assert torch.equal(batch["img"][row, :k], torch.from_numpy(x))
        assert torch.equal(batch["boxes"][row, :k], torch.from_numpy(bx))
        assert not batch["img"][row, k:].any() and not batch["boxes"][row, k:].any()
        # mask = all-zero feature row: exactly the padded rows
        assert int((batch["img"][row].abs().sum(-1) == 0).sum()) == kmax - k


def test_max_regions_cuts_regions(vqa_val_root, vqa_task):
    root, feats = vqa_val_root
    task = vqa_task(root, MAX_REGIONS=12)
    task.prepare()
    ds = task.dataset("val")
    for i in range(0, 100, 9):
        item = ds[i]
        x, bx = feats[ds.entries[i]["image_id"]]
        k = min(len(x), 12)
        assert item["img"].shape == (k, 2048) and item["boxes"].shape == (k, 4)
        np.testing.assert_array_equal(item["img"], x[:k])


def test_pad_regions_of_empty_items():
    out = pad_regions([np.zeros((0, 4), np.float32), np.ones((2, 4), np.float32)], 4)
    assert out.shape == (2, 2, 4) and not out[0].any() and out[1].all()
    assert pad_regions([np.zeros((0, 4), np.float32)], 4).shape == (1, 1, 4)


def test_subset_keeps_the_first_questions(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    task = vqa_task(root, SUBSET=7)
    task.prepare()
    ds = task.dataset("val")
    assert len(ds) == 7 and ds.entries[0]["question_id"] == 262148000


# --------------------------------------------------------------------------- answer dictionary


def test_answer_dict_is_the_shipped_order(prepared):
    task, _, _ = prepared
    ans_to_ix, ix_to_ans = json.loads(SHIPPED_DICT.read_text())
    assert len(task.ans_to_ix) == 3129
    assert list(task.ans_to_ix.items()) == list(ans_to_ix.items())
    assert task.ix_to_ans == [ix_to_ans[str(i)] for i in range(3129)]
    assert task.ix_to_ans[:4] == ["net", "pitcher", "orange", "yes"]
    assert any(line == "answers: 3129" for line in task.lines)


def test_answer_vocabulary_from_train_and_val_annotations(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    shutil.copyfile(REAL_VQA / "v2_mscoco_train2014_annotations.sample.json",
                    root / "vqa" / "v2_mscoco_train2014_annotations.json")
    task = vqa_task(root, ANSWER_DICT="", ANS_MIN_COUNT=3)
    task.prepare()
    # processed multiple_choice_answer of train then val, >= 3 times, first-seen order;
    # 'none' is processed to '0' (counted together with '0')
    expected = ["yes", "white", "skiing", "no", "1", "green", "2", "3", "7", "0"]
    assert list(task.ans_to_ix) == expected
    assert task.ans_to_ix == {a: i for i, a in enumerate(expected)}
    assert task.ix_to_ans == expected
    [cache] = (root / "vqa" / "cache").glob("answer_dict_*_min3.json")
    saved = json.loads(cache.read_text())
    assert saved == [task.ans_to_ix, {str(i): a for i, a in enumerate(expected)}]
    # a lower threshold keeps more, still in first-seen order
    task2 = vqa_task(root, ANSWER_DICT="", ANS_MIN_COUNT=2)
    task2.prepare()
    assert len(task2.ans_to_ix) == 19
    assert [a for a in task2.ans_to_ix if a in expected] == expected
    # the target of question 262148000 ('down' is not frequent enough here) is all zero
    ds = task.dataset("val")
    assert task.collate([ds[0]])["target"].shape == (1, 10)
    assert not task.collate([ds[0]])["target"].any()


def test_count_answers_with_the_default_threshold(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    shutil.copyfile(REAL_VQA / "v2_mscoco_train2014_annotations.sample.json",
                    root / "vqa" / "v2_mscoco_train2014_annotations.json")
    task = vqa_task(root, ANSWER_DICT="")
    assert task.cfg.ANS_MIN_COUNT == 9
    assert task._count_answers() == {"yes": 0, "no": 1, "1": 2}


def test_answer_vocabulary_needs_train_annotations(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    task = vqa_task(root, ANSWER_DICT="", ANS_MIN_COUNT=3)
    with pytest.raises(FileNotFoundError, match="v2_mscoco_train2014_annotations.json"):
        task.prepare()


# --------------------------------------------------------------------------- caching


def test_cache_is_written_once_and_reused(vqa_val_root, vqa_task, monkeypatch):
    root, _ = vqa_val_root
    first = vqa_task(root)
    first.prepare()
    cache = root / "vqa" / "cache"
    vocab_files = sorted(cache.glob("vocab_*.json"))
    emb_files = sorted(cache.glob("emb_*_hash.npy"))
    assert len(vocab_files) == 1 and len(emb_files) == 1
    assert any("computing" in line for line in first.lines)
    stamps = {p: p.stat().st_mtime_ns for p in vocab_files + emb_files}

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")
    monkeypatch.setattr(text_mod, "word_vectors", boom)
    monkeypatch.setattr(text_mod, "build_vocab", boom)
    second = vqa_task(root)
    second.prepare()
    assert second.vocab == first.vocab
    np.testing.assert_array_equal(second.word_vectors, first.word_vectors)
    assert not any("computing" in line for line in second.lines)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(cache.iterdir()) == sorted(vocab_files + emb_files)


def test_another_word_vector_source_gets_its_own_cache(vqa_val_root, vqa_task, monkeypatch):
    root, _ = vqa_val_root
    vqa_task(root).prepare()
    calls = []

    def fake(source, words, dim=300):
        calls.append(source)
        return np.ones((len(words), dim), np.float32)
    monkeypatch.setattr(text_mod, "word_vectors", fake)
    task = vqa_task(root, WORD_VECTORS="glove:/nowhere/glove.txt")
    task.prepare()
    assert calls == ["glove:/nowhere/glove.txt"]
    assert (task.word_vectors == 1).all()
    assert len(list((root / "vqa" / "cache").glob("emb_*"))) == 2
    assert len(list((root / "vqa" / "cache").glob("vocab_*"))) == 1


# --------------------------------------------------------------------------- missing files


def test_train_split_without_its_files_names_the_file(prepared):
    task, root, _ = prepared
    with pytest.raises(FileNotFoundError) as e:
        task.dataset("train")
    assert str(root / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json") in str(e.value)
    assert "does not exist" in str(e.value)
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_train2014_questions"):
        task.dataset("val+train")


def test_unknown_split_lists_the_valid_ones(prepared):
    task, _, _ = prepared
    with pytest.raises(ValueError) as e:
        task.dataset("val+dev")
    assert "'dev'" in str(e.value) and "train, val, test, test-dev, vg" in str(e.value)


def test_prepare_without_question_files(tmp_path, vqa_task):
    (tmp_path / "vqa").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        vqa_task(tmp_path).prepare()
    assert str(tmp_path / "vqa") in str(e.value)
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in str(e.value)


def test_answer_vocabulary_follows_changed_annotations(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    train = root / "vqa" / "v2_mscoco_train2014_annotations.json"
    shutil.copyfile(REAL_VQA / "v2_mscoco_train2014_annotations.sample.json", train)
    vqa_task(root, ANSWER_DICT="", ANS_MIN_COUNT=3).prepare()
    data = json.loads(train.read_text())
    for a in data["annotations"]:
        a["multiple_choice_answer"] = "zebra"
    train.write_text(json.dumps(data))
    task = vqa_task(root, ANSWER_DICT="", ANS_MIN_COUNT=3)
    task.prepare()
    assert task.ans_to_ix == task._count_answers()
    assert list(task.ans_to_ix)[0] == "zebra"


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not a valid JSON VQA questions file"]),
    (json.dumps({"annotations": []}), ["expected an object with a 'questions' list"]),
    (json.dumps([{"image_id": 1, "question": "q?", "question_id": 1}]),
     ["expected an object with a 'questions' list"]),
    (json.dumps({"questions": [{"image_id": 42, "question": "Is it?", "question_id": 1},
                               {"image_id": 42, "question": "What?", "question_id": "2"}]}),
     ["questions[1].question_id is '2', expected int"]),
    (json.dumps({"questions": [{"image_id": 42, "question_id": 1}]}),
     ["questions[0].question is missing, expected str"]),
    (json.dumps({"questions": [{"image_id": True, "question": "q?", "question_id": 1}]}),
     ["questions[0].image_id is True, expected int"]),
    (json.dumps({"questions": ["Is it?"]}),
     ["questions[0] is str, expected an object"]),
])
def test_malformed_question_file(vqa_val_root, vqa_task, content, words):
    root, _ = vqa_val_root
    path = root / "vqa" / QFILE
    path.write_text(content)
    task = vqa_task(root)
    with pytest.raises(ValueError) as e:
        task.prepare()                       # the vocabulary reads the questions first
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    for w in words:
        assert w in msg


def test_malformed_question_file_seen_by_dataset_too(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    task = vqa_task(root)
    task.prepare()
    path = root / "vqa" / QFILE
    _rewrite(path, lambda d: d["questions"][5].update(question_id="262148005"))
    with pytest.raises(ValueError) as e:
        task.dataset("val")
    assert str(e.value) == (f"{path}: questions[5].question_id is '262148005', "
                            f"expected int")


def test_answer_without_answer_field(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    path = root / "vqa" / AFILE
    _rewrite(path, lambda d: d["annotations"][3]["answers"][2].pop("answer"))
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(ValueError) as e:
        task.dataset("val")
    assert str(e.value) == f"{path}: annotations[3].answers[2].answer is missing, expected str"


@pytest.mark.parametrize("field, value, words", [
    ("multiple_choice_answer", None, "annotations[0].multiple_choice_answer is None, "
                                     "expected str"),
    ("answers", "down", "annotations[0].answers is 'down', expected list"),
    ("question_id", 262148000.0, "annotations[0].question_id is 262148000.0, expected int"),
])
def test_annotation_with_wrong_field(vqa_val_root, vqa_task, field, value, words):
    root, _ = vqa_val_root
    path = root / "vqa" / AFILE
    _rewrite(path, lambda d: d["annotations"][0].update({field: value}))
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(ValueError) as e:
        task.dataset("val")
    assert str(e.value) == f"{path}: {words}"


def test_question_without_annotation(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    path = root / "vqa" / AFILE
    _rewrite(path, lambda d: d["annotations"].pop(
        next(i for i, a in enumerate(d["annotations"]) if a["question_id"] == 262148001)))
    task = vqa_task(root)
    task.prepare()
    with pytest.raises(ValueError) as e:
        task.dataset("val")
    assert str(e.value) == f"{path}: no annotation for question_id 262148001 of {QFILE}"


def test_annotation_file_not_json_or_without_list(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    path = root / "vqa" / AFILE
    task = vqa_task(root)
    task.prepare()
    path.write_text("")
    with pytest.raises(ValueError, match="not a valid JSON VQA annotations file"):
        task.dataset("val")
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError) as e:
        task.dataset("val")
    assert str(e.value) == f"{path}: expected an object with an 'annotations' list"


def test_missing_annotation_file(vqa_val_root, vqa_task):
    root, _ = vqa_val_root
    task = vqa_task(root)
    task.prepare()
    (root / "vqa" / AFILE).unlink()
    with pytest.raises(FileNotFoundError) as e:
        task.dataset("val")
    assert str(e.value) == f"VQA annotations file {root / 'vqa' / AFILE} does not exist"


def test_bad_answer_dictionary_file(vqa_val_root, vqa_task, tmp_path):
    root, _ = vqa_val_root
    bad = tmp_path / "answers.json"
    bad.write_text(json.dumps({"yes": 0}))
    with pytest.raises(ValueError) as e:
        vqa_task(root, ANSWER_DICT=str(bad)).prepare()
    assert str(e.value) == f"{bad}: expected [ans_to_ix, ix_to_ans]"
    with pytest.raises(FileNotFoundError, match="answer dictionary file .*nothere.json"):
        vqa_task(root, ANSWER_DICT=str(tmp_path / "nothere.json")).prepare()


def test_non_utf8_question_file_stops_the_script(vqa_val_root, capsys):
    root, _ = vqa_val_root
    path = root / "vqa" / QFILE
    first_question = json.loads(path.read_text())["questions"][0]["question"]
    offset = latin1_into(path, first_question)
    message = script_error(capsys, "train", root)
    assert message == (f"{path}: not UTF-8 text: byte 0xe9 at byte offset {offset:,} (line 1): "
                       f"invalid continuation byte; save the file as UTF-8")
    assert_nothing_saved(root)
