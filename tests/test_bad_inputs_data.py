"""Broken data files and non-finite numbers: one clear error naming the file and the field
(or the step and the samples), never a traceback, never NaN weights or a half-good run folder.

Each case breaks one input of the real VQA sample tree (``conftest.vqa_val_root``) or of a
copy of the real RefCOCOg / Flickr30K samples, runs the code a user runs (the train and
search scripts' bodies in-process, ``preprocess_vgd.py``'s main, the readers) and checks the
error type or exit status, the message, and that nothing already written changed.
"""
import json
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import core.data.pack as pack_mod
import core.data.packed as packed
from core.tasks.vgd import refer
from core.data.npz import FeatureError, read_npz
from core.tasks.itm.flickr import read_split
from core.run import Run, main
from core.loop import weight_step
from core.finite import NonFiniteError
from core.mixed import Architect
from core.search import run_search
from core.tasks.vqa import VQATask
from core.train import run_train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
QFILE = "v2_OpenEnded_mscoco_val2014_questions.json"
BAD_IMAGE = 262148             # the image of the first questions; its x is stored [K, 2048]
SUBSET = 4                     # one batch: every run step reads every sample
TINY_ARCH = {"epoch0": {"enc": [["self_att_64"]], "dec": [["guided_att_64"]]}}


def feature(root: Path, iid: int = BAD_IMAGE) -> Path:
    return root / "coco_extract" / "val2014" / f"COCO_val2014_{iid:012d}.jpg.npz"


def first_question_ids(root: Path, n: int = SUBSET) -> list[int]:
    return [q["question_id"] for q in
            json.loads((root / "vqa" / QFILE).read_text())["questions"][:n]]


# --------------------------------------------------------------------------- runners


def tiny_args(root: Path, kind: str) -> list[str]:
    """A one-step epoch of 4 real questions, one block a side, HSIZE 64 (the demo's sizes)."""
    args = [f"--DATA_ROOT={root}", f"--LOG_ROOT={root / 'logs'}", "--WORD_VECTORS=hash",
            "--ANSWER_DICT=core/data/vqa_answer_dict.json", "--TRAIN_SPLIT=val",
            f"--SUBSET={SUBSET}", f"--BS={SUBSET}", "--NW=0", "--SEED=3", "--MAX_EPOCH=1",
            "--EVAL_EVERY_EPOCH=false", "--HSIZE=64", "--FLAT_MLP_SIZE=64", "--REL_SIZE=16",
            "--MAX_REGIONS=16", "--MAX_TOKEN=8", "--ENC_BLOCKS=1", "--DEC_BLOCKS=1",
            "--VERSION=a"]
    if kind == "train":
        arch = root / "tiny_arch.json"
        arch.write_text(json.dumps(TINY_ARCH))
        args.append(f"--ARCH_PATH={arch}")
    return args


def script_error(capsys, kind: str, root: Path, *extra: str) -> str:
    """Run train_vqa.py / search_vqa.py's body: it must exit 2, its last line the error."""
    runner = run_train if kind == "train" else run_search
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(VQATask, kind, runner, tiny_args(root, kind) + list(extra))
    assert e.value.code == 2
    err = capsys.readouterr().err         # the progress bar's lines, then the error
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and err.count("error:") == 1, err
    return last[len("error: "):]


def run_folder(root: Path, kind: str = "train") -> Path:
    return root / "logs" / "vqa" / kind / "a"


def assert_nothing_saved(root: Path, kind: str = "train") -> None:
    folder = run_folder(root, kind)
    assert not list(folder.glob("*.pkl")) and not (folder / "last").exists()
    assert not (folder / "arch.json").exists()


def reader_error(root: Path, iid: int = BAD_IMAGE) -> str:
    with pytest.raises(FeatureError) as e:
        read_npz(feature(root, iid), 2048, 100)
    return str(e.value)


# --------------------------------------------------------------------------- broken files


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


# --------------------------------------------------------------------------- non-finite steps


def nan_packed_store(root: Path) -> None:
    """A store packed before the pack-time check existed (or hit by a bit flip): NaN rows."""
    store = root / "coco_extract" / "packed"
    pack_mod.pack([root / "coco_extract" / "val2014"], store, dtype="float32", progress=False)
    rows = np.memmap(store / "feats.f32", dtype=np.float32, mode="r+")
    rows[:] = np.nan
    rows.flush()
    del rows


def test_nan_loss_stops_training_and_leaves_the_earlier_checkpoint(vqa_val_root, capsys):
    """Epoch 1 trains; its features then turn NaN: resuming stops at the first step of epoch
    2, naming it and the batch's question ids, and epoch1.pkl / 'last' stay as they were."""
    root, _ = vqa_val_root
    main(VQATask, "train", run_train, tiny_args(root, "train"))
    folder = run_folder(root)
    before = {p.name: p.read_bytes() for p in folder.iterdir()
              if p.is_file() and p.name not in ("log.txt", "config.yaml")}  # both rewritten
    assert {"epoch1.pkl", "last"} <= set(before)
    nan_packed_store(root)
    message = script_error(capsys, "train", root, "--RESUME", "--MAX_EPOCH=2")
    assert message.startswith("epoch 2, step 2: the loss is nan on the batch of question "
                              "ids [")
    listed = [int(i) for i in message.split("[")[1].split("]")[0].split(", ")]
    assert sorted(listed) == sorted(first_question_ids(root))
    assert "nothing updated or saved" in message
    after = {p.name: p.read_bytes() for p in folder.iterdir()
             if p.is_file() and p.name not in ("log.txt", "config.yaml")}
    assert after == before


def test_nan_loss_stops_the_search_before_arch_json(vqa_val_root, capsys):
    root, _ = vqa_val_root
    nan_packed_store(root)
    message = script_error(capsys, "search", root, "--ARCH_START_EPOCH=0",
                           "--ARCH_STEP_EVERY=1")
    assert message.startswith("epoch 1, step 1: the loss is nan on the batch of question ids [")
    assert_nothing_saved(root, "search")


class TinyTask:
    """The task seam weight_step needs: a sum-of-squares loss and a batch with ids."""
    batch_ids = ("qid", "question ids")
    describe_batch = VQATask.describe_batch

    @staticmethod
    def loss(out, batch):
        return (out ** 2).sum()


def tiny_step(net, hook, scaler=None):
    cfg = type("Cfg", (), {"AMP": "off", "GRAD_CLIP": 1.0})()
    net[0].weight.register_hook(hook)
    optim = torch.optim.Adam(net.parameters(), lr=0.1)
    batch = {"x": torch.ones(2, 3), "qid": [7, 9]}
    net.forward = lambda b, f=net.forward: f(b["x"])
    return weight_step(net, TinyTask(), batch, optim, list(net.parameters()), cfg,
                       torch.device("cpu"), scaler, where="epoch 4, step 120")


def test_nan_gradient_with_a_finite_loss_stops_before_the_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteError) as e:
        tiny_step(net, lambda g: g * float("nan"))
    assert str(e.value).startswith("epoch 4, step 120: the gradient of 0.weight holds 6 "
                                   "non-finite value(s) on the batch of question ids [7, 9]")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_inf_gradient_under_loss_scaling_is_skipped_not_an_error():
    """fp16's GradScaler sees inf gradients on purpose: it skips the step and lowers the scale."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    tiny_step(net, lambda g: g * float("inf"), scaler)
    assert scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_nan_architecture_loss_leaves_alpha_unchanged():
    from core.config import resolve
    from core.model import search_backbone
    cfg = resolve("vqa", "search", {"HSIZE": 64, "ENC_BLOCKS": 1, "DEC_BLOCKS": 2,
                                    "DATASET": "demo"})
    backbone = search_backbone(cfg)
    architect = Architect(backbone, 0.1, (0.0, 0.999), "full")
    alphas = [m.alpha.detach().clone() for m in architect.mixed]

    def nan_loss():
        return sum((m.gates * float("nan")).sum() for m in architect.mixed)
    with pytest.raises(NonFiniteError) as e:
        architect.step(nan_loss, torch.Generator().manual_seed(0),
                       lambda problem: f"epoch 2, step 40, architecture step: {problem}")
    assert str(e.value) == "epoch 2, step 40, architecture step: the loss is nan"
    assert all(torch.equal(m.alpha.detach(), a) for m, a in zip(architect.mixed, alphas))
    assert all(m.gates is None for m in architect.mixed)


def test_checkpoint_with_nan_weights_is_refused_and_the_old_one_kept(tmp_path):
    run = Run(tmp_path / "run", resume=False)
    good = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    path = run.checkpoint(1, good)
    old = path.read_bytes()
    bad = {"state_dict": {"w": torch.ones(3), "head.b": torch.tensor([1.0, float("inf")])},
           "net_optim": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}
    with pytest.raises(NonFiniteError) as e:
        run.checkpoint(1, bad)
    assert str(e.value) == (f"checkpoint {path}: refused to write it: state_dict.head.b holds 1 "
                            f"non-finite value(s) (2 tensor(s) in all); earlier checkpoints are "
                            f"left as they were")
    assert path.read_bytes() == old and (tmp_path / "run" / "last").read_text() == "epoch1.pkl\n"
    with pytest.raises(NonFiniteError):
        run.checkpoint(2, bad)
    assert not (tmp_path / "run" / "epoch2.pkl").exists()


# --------------------------------------------------------------------------- text files


NOT_UTF8 = "Is the café open?".encode("latin-1")     # 0xe9 where UTF-8 needs two bytes


def latin1_into(path: Path, marker: str) -> int:
    """Replace ``marker`` in the text of ``path`` by latin-1 bytes; returns their offset."""
    data = path.read_bytes()
    offset = data.index(marker.encode())
    path.write_bytes(data.replace(marker.encode(), NOT_UTF8, 1))
    return offset + NOT_UTF8.index(b"\xe9")


def test_non_utf8_question_file_stops_the_script(vqa_val_root, capsys):
    root, _ = vqa_val_root
    path = root / "vqa" / QFILE
    first_question = json.loads(path.read_text())["questions"][0]["question"]
    offset = latin1_into(path, first_question)
    message = script_error(capsys, "train", root)
    assert message == (f"{path}: not UTF-8 text: byte 0xe9 at byte offset {offset:,} (line 1): "
                       f"invalid continuation byte; save the file as UTF-8")
    assert_nothing_saved(root)


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


def test_non_utf8_grounding_split_names_the_file(tmp_path):
    from core.config import resolve
    from core.tasks.vgd import VGDTask
    folder = tmp_path / "vgd" / "refcocog"
    splits = refer.convert("refcocog", DATA / "refcocog")
    refer.write_splits(splits, folder)
    path = folder / "val.json"
    offset = latin1_into(path, splits["val"][0]["sent"])
    task = VGDTask(resolve("vgd", "train", {"DATA_ROOT": str(tmp_path), "DATASET": "refcocog",
                                           "WORD_VECTORS": "hash"}), log=lambda m: None)
    with pytest.raises(ValueError) as e:
        task.prepare()
    assert str(e.value).startswith(f"{path}: not UTF-8 text: byte 0xe9 at byte offset "
                                   f"{offset:,} (line ")


# --------------------------------------------------------------------------- refs pickles


@pytest.fixture
def raw(tmp_path):
    shutil.copytree(DATA / "refcocog", tmp_path / "raw")
    return tmp_path / "raw"


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


def test_non_utf8_architecture_file_names_the_file(tmp_path):
    from core.arch import load_arch
    arch = tmp_path / "arch.json"
    arch.write_bytes(b'{"epoch0": {"enc": [["self_att_64"]], "dec": [["guided\xe9"]]}}')
    with pytest.raises(ValueError, match=rf"{arch}.*byte 0xe9 at byte offset 54 \(line 1\)"):
        load_arch(arch, 0, 1, 1)


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
