"""One question about one image: the top answers of a trained VQA model (``infer_vqa.py``).

The model, its vocabulary and its answers come from the checkpoint (ours carry all three);
the original's released files carry no vocabulary, which is then rebuilt from the question
files under ``DATA_ROOT`` exactly as training builds it. No word vectors are read: the
embedding is the checkpoint's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.config import KEYS, resolve
from core.data.npz import FeatureError, read_npz
from core.data.text import encode, tokenize
from core.loop import build_net, check_vocabularies
from core.model import fixed_backbone
from core.tasks.vqa import VQATask
from core.train import _architecture
from utils.checkpoint import CheckpointError, load_checkpoint, load_weights


def load_model(ckpt_path: str, arch_path: str = "", arch_epoch: int = 0,
               data_root: str | None = None, log=print):
    """(network in eval mode, its VQATask with vocabulary and answers) of a checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("task", "vqa") != "vqa" or ckpt.get("kind") == "search":
        what = f"a {ckpt.get('task')} {ckpt.get('kind')} checkpoint"
        raise CheckpointError(f"{ckpt_path}: {what}; infer_vqa.py needs a VQA training "
                              f"checkpoint (train_vqa.py) or the original's released one")
    cfg = resolve("vqa", "train", _settings(ckpt, arch_path, arch_epoch, data_root))
    task = VQATask(cfg, log)
    meta = ckpt.get("meta") or {}
    if "vocab" in meta and "answers" in meta:
        task.vocab = {w: i for i, w in enumerate(meta["vocab"])}
        task.ix_to_ans = list(meta["answers"])
        task.ans_to_ix = {a: i for i, a in enumerate(task.ix_to_ans)}
    else:       # a released file: the vocabulary is the data's, rebuilt the original's way
        task.prepare(word_vectors=False)
        note = check_vocabularies(ckpt, task.model_meta(), str(ckpt_path))
        if note:
            log(note)
    arch = _architecture(cfg, ckpt, ckpt_path)
    net = build_net(cfg, task, fixed_backbone(cfg, arch))
    load_weights(net, ckpt["state_dict"], str(ckpt_path), task.original_key_prefixes)
    return net.eval(), task


def _settings(ckpt: dict, arch_path: str, arch_epoch: int, data_root: str | None) -> dict:
    """The checkpoint's config (ours), or the VQA training defaults (a released file)."""
    values = {k: v for k, v in (ckpt.get("config") or {}).items()
              if k in KEYS and k not in ("TASK", "CKPT_PATH")}
    values.update(RESUME=False, RUN_MODE="val", SUBSET=0, NUM_WORKERS=0)
    if arch_path:
        values.update(ARCH_PATH=arch_path, ARCH_EPOCH=arch_epoch)
    if data_root:
        values["DATA_ROOT"] = data_root
    return values


@torch.no_grad()
def top_answers(net, task: VQATask, features: Path, question: str, top: int = 5
                ) -> tuple[list[tuple[str, float]], list[str]]:
    """([(answer, sigmoid score)] best first, the question's words the vocabulary lacks)."""
    cfg = task.cfg
    words = tokenize(question)
    if not words:
        raise ValueError(f"--QUESTION={question!r}: no words in it")
    if not Path(features).is_file():
        raise FeatureError(f"--FEATURES={features}: no such file; expected a bottom-up-"
                           f"attention .npz (x, bbox, image_h, image_w), as in dataset_setup.md")
    img, boxes, _ = read_npz(Path(features), cfg.IMG_FEAT_SIZE, cfg.MAX_REGIONS)
    sample = {"txt": encode(question, task.vocab, cfg.MAX_TOKEN), "img": img, "boxes": boxes,
              "qid": 0}
    scores = torch.sigmoid(net(task.collate([sample]))[0].float())
    best = torch.topk(scores, min(top, len(scores)))
    answers = [(task.ix_to_ans[i], float(s)) for s, i in zip(best.values, best.indices.tolist())]
    return answers, [w for w in words[:cfg.MAX_TOKEN] if w not in task.vocab]
