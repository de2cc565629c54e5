"""User errors stop with one message naming the file, the field and what was expected."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.arch import ArchError, load_arch
from core.config import resolve
from core.data.npz import FeatureError, NpzFeatures, read_npz
from core.model import Net, PooledFusionHead, fixed_backbone
from utils.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
QFILE = "v2_OpenEnded_mscoco_val2014_questions.json"
AFILE = "v2_mscoco_val2014_annotations.json"


def _feature(root, iid):
    return root / "coco_extract" / "val2014" / f"COCO_val2014_{iid:012d}.jpg.npz"


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- features


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


# --------------------------------------------------------------------------- question files


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


# --------------------------------------------------------------------------- annotation files


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


# --------------------------------------------------------------------------- architectures


def _arch_file(tmp_path, entry, key="epoch0"):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({key: entry}))
    return path


def _mcan_entry():
    return json.loads((REPO / "arch" / "mcan.json").read_text())["epoch0"]


def test_shipped_mcan_architecture():
    arch = load_arch(REPO / "arch" / "mcan.json", 0, 12, 18)
    assert arch.enc == ("self_att_64", "feed_forward") * 6
    assert arch.dec == ("self_att_64", "guided_att_64", "feed_forward") * 6


def test_arch_unknown_op_lists_valid_names(tmp_path):
    entry = _mcan_entry()
    entry["dec"][4] = ["guided_att_65"]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError) as e:
        load_arch(path, 0, 12, 18)
    msg = str(e.value)
    assert msg.startswith(f"{path} [epoch0]: dec[4] has unknown op 'guided_att_65'")
    for name in ("self_att_64", "guided_att_64", "rel_self_att_64", "feed_forward"):
        assert name in msg


def test_arch_missing_epoch_lists_keys_present(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"epoch10": _mcan_entry(), "epoch2": _mcan_entry()}))
    with pytest.raises(ArchError) as e:
        load_arch(path, 5, 12, 18)
    assert str(e.value) == (f"{path}: no key 'epoch5' (from --ARCH_EPOCH=5); keys present: "
                            f"epoch2, epoch10")
    path.write_text("{}")
    with pytest.raises(ArchError, match="keys present: none"):
        load_arch(path, 0, 12, 18)


@pytest.mark.parametrize("side, n, expected", [("enc", 11, 12), ("dec", 17, 18),
                                               ("dec", 19, 18)])
def test_arch_wrong_block_count(tmp_path, side, n, expected):
    entry = _mcan_entry()
    entry[side] = (entry[side] * 2)[:n]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError) as e:
        load_arch(path, 0, 12, 18)
    assert str(e.value) == (f"{path} [epoch0]: field '{side}' has {n} blocks, expected "
                            f"{expected} ({side.upper()}_BLOCKS)")


def test_arch_file_missing_or_not_json_or_bad_block(tmp_path):
    with pytest.raises(ArchError, match="architecture file .*nope.json does not exist"):
        load_arch(tmp_path / "nope.json", 0, 12, 18)
    path = tmp_path / "arch.json"
    path.write_text("{epoch0:")
    with pytest.raises(ArchError, match=r"arch.json: not valid JSON"):
        load_arch(path, 0, 12, 18)
    entry = _mcan_entry()
    entry["enc"][0] = ["self_att_64", "feed_forward"]
    path = _arch_file(tmp_path, entry)
    with pytest.raises(ArchError, match=r"enc\[0\] = \['self_att_64', 'feed_forward'\], "
                                        r"expected \[\"op name\"\]"):
        load_arch(path, 0, 12, 18)
    path = _arch_file(tmp_path, {"enc": _mcan_entry()["enc"]})
    with pytest.raises(ArchError, match="field 'dec' is missing or not a list"):
        load_arch(path, 0, 12, 18)


# --------------------------------------------------------------------------- checkpoints


def _small_net(vocab_size, n_answers=10):
    cfg = resolve("vqa", "train", {"HSIZE": 64, "FLAT_MLP_SIZE": 64, "REL_SIZE": 16,
                                   "DATASET": "demo"})
    arch = load_arch(REPO / "arch" / "mcan.json", 0, 12, 18)
    return Net(vocab_size, None, cfg, fixed_backbone(cfg, arch), PooledFusionHead(cfg, n_answers))


@pytest.fixture(scope="module")
def net_state():
    torch.manual_seed(0)
    return _small_net(20).state_dict()


def test_checkpoint_round_trip(tmp_path, net_state):
    path = tmp_path / "ok.pkl"
    save_checkpoint(path, {"state_dict": net_state, "epoch": 3})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "mmnas-v1" and ckpt["epoch"] == 3
    net = _small_net(20)
    load_weights(net, ckpt["state_dict"], str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_state[k]), k


def test_checkpoint_with_other_vocabulary_names_key_and_shapes(tmp_path, net_state):
    path = tmp_path / "epoch3.pkl"
    save_checkpoint(path, {"state_dict": net_state})
    other = _small_net(25)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(other, load_checkpoint(path)["state_dict"], str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not fit this network")
    assert "shape" in msg and "embedding.weight" in msg
    assert "checkpoint [20, 300], network [25, 300]" in msg
    for k, v in other.state_dict().items():       # nothing half-loaded
        assert torch.equal(v, before[k]), k


def test_checkpoint_with_other_answer_set_and_missing_keys(tmp_path, net_state):
    path = tmp_path / "epoch3.pkl"
    state = dict(net_state)
    state.pop("lstm.weight_ih_l0")
    state["extra.weight"] = torch.zeros(2)
    save_checkpoint(path, {"state_dict": state})
    with pytest.raises(CheckpointError) as e:
        load_weights(_small_net(20, n_answers=11), load_checkpoint(path)["state_dict"],
                     str(path))
    msg = str(e.value)
    assert "head.proj.weight: checkpoint [10, 128], network [11, 128]" in msg
    assert "missing" in msg and "lstm.weight_ih_l0" in msg
    assert "fit nothing" in msg and "extra.weight" in msg


def test_released_checkpoint_names_are_mapped(tmp_path, net_state):
    from releasedkit import released_names
    released = released_names(net_state, "vqa")
    assert "module.backnone.cells_dec.0.dag.2.0.ln.a_2" in released
    from core.tasks.vqa import VQATask
    net = _small_net(20)
    load_weights(net, released, "released.pkl", VQATask.original_key_prefixes)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_state[k]), k


def test_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "epoch13.pkl")
    assert str(e.value) == f"checkpoint {tmp_path / 'epoch13.pkl'} does not exist"


def test_checkpoint_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "epoch1.pkl"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": {}}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path}: expected a dict with a 'state_dict' entry"


# --------------------------------------------------------------------------- the real script


def test_train_script_unknown_flag_exits_2_with_one_error_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_vqa.py", "--DATASET=demo", "--HSIZ=3",
                           f"--LOG_ROOT={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")
    assert "--HSIZ" in proc.stderr and "HSIZE" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not any(tmp_path.iterdir())               # no run folder made


def test_train_script_missing_arch_file_exits_2_with_one_error_line(vqa_val_root):
    root, _ = vqa_val_root
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_vqa.py", f"--DATA_ROOT={root}",
                           "--WORD_VECTORS=hash", f"--LOG_ROOT={root / 'logs'}",
                           f"--ARCH_PATH={root / 'nope.json'}", "--VERSION=a"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert f"architecture file {root / 'nope.json'} does not exist" in proc.stderr
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
