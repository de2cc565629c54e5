"""Shared fixtures and helpers: a VQA data tree built from the real VQA-v2 sample files in
tests/data, text that is not UTF-8, in-process runs of a script that must fail."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import demo  # noqa: F401  (registers the --DATASET=demo builders, as the scripts do)
from core.run import main
from core.search import run_search
from core.tasks.vqa import VQATask
from core.train import run_train

REAL_VQA = Path(__file__).resolve().parent / "data" / "vqa"
VAL_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VAL_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
TRAIN_ANNOTATIONS_SAMPLE = "v2_mscoco_train2014_annotations.sample.json"
# The 19 images of the real val sample, in sorted order.
VAL_IMAGE_IDS = [42, 131089, 131108, 131115, 240301, 262148, 262162, 262175, 262189, 262197,
                 262200, 393225, 393226, 393243, 393254, 393266, 393267, 393271, 393274]


def write_npz(path: Path, k: int, *, seed: int = 0, transposed: bool = True, x=None,
              bbox=None, height: int = 480, width: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """A feature file in the real bottom-up-attention layout; returns (x [K, 2048], bbox).

    ``transposed=True`` stores ``x`` as [2048, K] like the public files, False as [K, 2048].
    ``x``/``bbox`` given explicitly are written as they are (to make broken files).
    """
    rng = np.random.default_rng(seed)
    feats = rng.random((k, 2048), dtype=np.float32) + 0.01   # no all-zero row
    boxes = np.sort(rng.uniform(0, 400, (k, 4)).astype(np.float32).reshape(k, 2, 2),
                    axis=1).reshape(k, 4)
    stored_x = x if x is not None else (feats.T.copy() if transposed else feats)
    stored_b = bbox if bbox is not None else boxes
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=stored_x, bbox=stored_b, image_h=np.int64(height),
             image_w=np.int64(width), num_bbox=np.int64(len(stored_b)))
    return feats, boxes


def feature_name(split_dir: str, image_id: int) -> str:
    return f"COCO_{split_dir}_{image_id:012d}.jpg.npz"


@pytest.fixture
def vqa_val_root(tmp_path):
    """``tmp_path`` holding the real val questions/annotations and features for all 19 images.

    Region counts vary (10..36); image 262148 stores ``x`` as [K, 2048], the others [2048, K].
    Returns (root, {image_id: (x [K, 2048], bbox [K, 4])}).
    """
    (tmp_path / "vqa").mkdir()
    for name in (VAL_QUESTIONS, VAL_ANNOTATIONS):
        shutil.copyfile(REAL_VQA / name, tmp_path / "vqa" / name)
    feats = {}
    folder = tmp_path / "coco_extract" / "val2014"
    for n, iid in enumerate(VAL_IMAGE_IDS):
        k = 10 + (n * 7) % 27          # 10 .. 36
        feats[iid] = write_npz(folder / feature_name("val2014", iid), k, seed=iid,
                               transposed=iid != 262148)
    return tmp_path, feats


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny networks: a second thread only spins (and costs 10x the CPU on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, worker_id):
    """One ``--DATA_ROOT`` shared by the end-to-end runs on ``--DATASET=demo``, across the
    pytest-xdist workers too: the first run of a task builds its demo data there (10-30 s on
    one thread), the later ones find it built, or wait on the builder's lock
    (``demo.build.exclusive``) and then find it."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "demo-data"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
def npz_writer():
    """``write_npz`` (see above), for tests that make their own feature files."""
    return write_npz


@pytest.fixture
def vqa_task():
    """``make(root, **config overrides)`` -> a VQATask on ``root`` with offline word vectors
    and the shipped 3,129-answer dictionary; its log lines go to ``task.lines``."""
    from core.config import resolve
    from core.tasks.vqa import VQATask

    def make(root, **over):
        values = {"DATA_ROOT": str(root), "WORD_VECTORS": "hash",
                  "ANSWER_DICT": "core/data/vqa_answer_dict.json"}
        values.update(over)
        lines = []
        task = VQATask(resolve("vqa", "train", values), log=lines.append)
        task.lines = lines
        return task
    return make


# --- text that is not UTF-8 ---------------------------------------------------------------

NOT_UTF8 = "Is the café open?".encode("latin-1")     # 0xe9 where UTF-8 needs two bytes


def latin1_into(path: Path, marker: str) -> int:
    """Replace ``marker`` in the text of ``path`` by latin-1 bytes; returns their offset."""
    data = path.read_bytes()
    offset = data.index(marker.encode())
    path.write_bytes(data.replace(marker.encode(), NOT_UTF8, 1))
    return offset + NOT_UTF8.index(b"\xe9")


# --- in-process runs of train_vqa.py / search_vqa.py on the real sample that must fail --------

BAD_IMAGE = 262148             # the image of the first questions; its x is stored [K, 2048]
SUBSET = 4                     # one batch: every run step reads every sample
TINY_ARCH = {"epoch0": {"enc": [["self_att_64"]], "dec": [["guided_att_64"]]}}


def feature(root: Path, iid: int = BAD_IMAGE) -> Path:
    return root / "coco_extract" / "val2014" / f"COCO_val2014_{iid:012d}.jpg.npz"


def first_question_ids(root: Path, n: int = SUBSET) -> list[int]:
    return [q["question_id"] for q in
            json.loads((root / "vqa" / VAL_QUESTIONS).read_text())["questions"][:n]]


def tiny_args(root: Path, kind: str) -> list[str]:
    """A one-step epoch of 4 real questions, one block a side, HSIZE 64 (the demo's sizes)."""
    args = [f"--DATA_ROOT={root}", f"--LOG_ROOT={root / 'logs'}", "--WORD_VECTORS=hash",
            "--ANSWER_DICT=core/data/vqa_answer_dict.json", "--TRAIN_SPLIT=val",
            f"--SUBSET={SUBSET}", f"--BS={SUBSET}", "--NW=0", "--SEED=3", "--MAX_EPOCH=1",
            "--EVAL_EVERY_EPOCH=false", "--HSIZE=64", "--FLAT_MLP_SIZE=64", "--REL_SIZE=16",
            "--MAX_REGIONS=16", "--MAX_TOKEN=8", "--ENC_BLOCKS=1", "--DEC_BLOCKS=1",
            "--VERSION=a", "--PICTURES=false"]
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
