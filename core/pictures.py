"""What a run draws into ``<run folder>/pictures/`` after every epoch, and the attention maps
of a trained model (``visualize.py attention``). The drawing itself is in ``utils/plots.py``.

A search draws the heatmap of softmax(alpha) of the epoch (``alphas_epochN.png``), every
block's probabilities over the epochs (``alpha_trajectories.png``), the arg-max architecture
(``arch_epochN.png``) and its loss and arg-max metric curves (``curves.png``); a training
its loss and metric curves. The numbers behind them are kept in ``pictures/history.json``;
a resumed run drops the entries of the epochs it redoes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.arch import parse_arch
from core.config import KEYS, resolve
from core.loop import build_net, check_vocabularies
from core.model import current_arch, fixed_backbone
from core.run import ensure_data
from utils import plots
from utils.checkpoint import load_checkpoint, load_weights
from utils.io import atomic_write_json


# --- after every epoch -------------------------------------------------------------------
def search_epoch(run, net, epoch: int, loss: float, metrics: dict, drawn: bool = True) -> None:
    """Rank 0, after the epoch's arg-max score; ``drawn`` False (``--PICTURES=false``) keeps
    only the numbers (history.json)."""
    blocks = {side: list(getattr(net.backbone, f"{side}_list")) for side in ("enc", "dec")}
    record = {"epoch": epoch, "loss": loss, **scalar_metrics(metrics, "arch split "),
              "alphas": {side: [m.probs().tolist() for m in b] for side, b in blocks.items()}}
    names = {side: list(b[0].names) for side, b in blocks.items() if b}

    def draw(folder, records):
        epochs = [r["epoch"] for r in records]
        plots.alpha_heatmap(folder / f"alphas_epoch{epoch}.png",
                            {s: (names[s], record["alphas"][s]) for s in names},
                            f"softmax(alpha) after epoch {epoch}")
        plots.alpha_trajectories(folder / "alpha_trajectories.png", epochs,
                                 {s: (names[s], [r["alphas"][s] for r in records])
                                  for s in names})
        plots.arch_diagram(folder / f"arch_epoch{epoch}.png",
                           current_arch(net.backbone).to_json(),
                           f"arg-max architecture after epoch {epoch}")
        plots.curves(folder / "curves.png", [_without(r, "alphas") for r in records],
                     "search: weight-step loss, arg-max metric on the architecture split")
    _update(run, record, draw if drawn else None)


def train_epoch(run, epoch: int, loss: float, record: dict | None, drawn: bool = True) -> None:
    """Rank 0, after the epoch's evaluation; ``record`` is its metrics.json entry (or None);
    ``drawn`` as for ``search_epoch``."""
    entry = {"epoch": epoch, "loss": loss}
    for split, metrics in (record or {}).items():
        if split != "epoch":
            entry.update(scalar_metrics(metrics, f"{split} "))
    _update(run, entry, (lambda folder, records: plots.curves(
        folder / "curves.png", records, "training: loss, metrics per epoch")) if drawn else None)


def scalar_metrics(metrics: dict, prefix: str) -> dict:
    """The top-level numbers of a metric dict (not counts: ``n``, ``n_questions``)."""
    return {prefix + k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "n" and not k.startswith("n_")}


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _update(run, record: dict, draw) -> None:
    """Append ``record`` to pictures/history.json (dropping the epochs a resumed run redoes)
    and redraw. A picture that cannot be written (a full disk) is a warning, not the end of
    the run."""
    if not run.main:
        return
    folder = run.folder / "pictures"
    path = folder / "history.json"
    try:
        records = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, json.JSONDecodeError):
        records = []            # a damaged history: start it again from this epoch
    records = [r for r in records if r["epoch"] < record["epoch"]] + [record]
    try:
        folder.mkdir(exist_ok=True)
        atomic_write_json(path, records)
        if draw is not None:
            draw(folder, records)
    except OSError as e:
        run.log(f"warning: pictures of epoch {record['epoch']} not written to {folder}: "
                f"{e.strerror or e}")


# --- attention of a trained model --------------------------------------------------------
def pooling_attention(net, batch) -> tuple[object, dict]:
    """(network output, {"img"/"lang": [B, N] softmax weights}) of the head's attention
    pooling (AttFlat), read with forward hooks: the hook recomputes the module's masked
    softmax from its own input (exact in eval mode); glimpses are averaged."""
    captured, handles = {}, []

    def reader(name):
        def hook(module, inputs, _output):
            x, mask = inputs
            att = module.mlp(x).masked_fill(mask.squeeze(1).squeeze(1).unsqueeze(2), -1e9)
            captured[name] = torch.softmax(att.float(), dim=1).mean(-1)
        return hook
    for name in ("img", "lang"):
        module = getattr(net.head, f"attflat_{name}", None)
        if module is not None:
            handles.append(module.register_forward_hook(reader(name)))
    net.eval()
    try:
        with torch.no_grad():
            out = net(batch)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def find_image(data_root: Path, image_id) -> Path | None:
    """The image file of ``image_id`` under ``<DATA_ROOT>/images/`` (or one folder below):
    ``COCO_<split>_<12-digit id>.jpg``, ``<id>.jpg`` or ``<12-digit id>.jpg``."""
    base = Path(data_root) / "images"
    if not base.is_dir():
        return None
    names = [f"{image_id}.jpg", f"{image_id}.png"]
    if isinstance(image_id, int) or str(image_id).isdigit():
        names += [f"COCO_*_{int(image_id):012d}.jpg", f"{int(image_id):012d}.jpg"]
    for pattern in names:
        for found in sorted(base.glob(pattern)) + sorted(base.glob(f"*/{pattern}")):
            return found
    return None


def load_image(path: Path | None):
    if path is None:
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class PictureError(ValueError):
    """A sample or checkpoint that cannot be drawn; the message says which and why."""


def draw_attention(ckpt_path, sample: str, out, tasks: dict, split: str | None = None,
                   data_root: str | None = None, log=print) -> dict:
    """The attention map of one sample (VQA question id, VGD sent id, ITM caption index in
    the split) under a training checkpoint; returns what ``plots.attention_map`` drew.
    ``tasks`` maps a task name to its Task class (the caller's: core does not import tasks)."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") != "train":
        raise PictureError(f"{ckpt_path}: a {ckpt.get('kind', 'released')} checkpoint; the "
                           f"attention map needs a training checkpoint (train_<task>.py)")
    values = {k: v for k, v in ckpt["config"].items()
              if k in KEYS and v is not None and k not in ("TASK", "CKPT_PATH")}
    values.update(SUBSET=0, RESUME=False, RUN_MODE="val")
    if data_root:
        values["DATA_ROOT"] = data_root
    cfg = resolve(ckpt["task"], "train", values)
    if ckpt["task"] not in tasks:
        raise PictureError(f"{ckpt_path}: a checkpoint of task {ckpt['task']!r}; expected one "
                           f"of {', '.join(tasks)}")
    task = tasks[ckpt["task"]](cfg, log)
    ensure_data(cfg, task, log)
    task.prepare(word_vectors=False)        # the embedding is the checkpoint's
    note = check_vocabularies(ckpt, task.model_meta(), str(ckpt_path))
    if note:
        log(note)
    arch = parse_arch(ckpt["arch"], f"{ckpt_path} [arch]", cfg.ENC_BLOCKS, cfg.DEC_BLOCKS)
    net = build_net(cfg, task, fixed_backbone(cfg, arch))
    load_weights(net, ckpt["state_dict"], str(ckpt_path), task.original_key_prefixes)
    split = split or cfg.EVAL_SPLIT.split(",")[0]
    dataset = task.dataset(split)
    index, image_id = _find_sample(task.name, dataset, sample, split)
    batch = task.collate([dataset[index]])
    output, att = pooling_attention(net, batch)
    words = [w for w in (task.model_meta()["vocab"][i] for i in batch["txt"][0].tolist() if i)]
    _, _, image_hw = dataset.feats.load(image_id, cfg.MAX_REGIONS)
    lines, marked, regions = _reading(task, output, batch, att, sample, split)
    image_file = find_image(Path(cfg.DATA_ROOT), image_id)
    drawn = plots.attention_map(out, image_hw, batch["boxes"][0].numpy(), regions, words,
                                att["lang"][0, :len(words)].numpy(), lines,
                                load_image(image_file), marked, weighted_by=
                                "the grounding score" if task.name == "vgd" else
                                "the image attention")
    drawn["image_file"] = image_file
    return drawn


def _find_sample(task: str, dataset, sample: str, split: str) -> tuple[int, object]:
    """(index in the dataset, image id of the features) of a sample named on the command line."""
    what = {"vqa": "question_id", "vgd": "sent_id", "itm": "caption index"}[task]
    if not str(sample).lstrip("-").isdigit():
        raise PictureError(f"--sample={sample!r}: expected an integer {what}")
    value = int(sample)
    if task == "itm":
        if not 0 <= value < len(dataset):
            raise PictureError(f"--sample={value}: split {split!r} has captions 0 .. "
                               f"{len(dataset) - 1}")
        return value, dataset.keys[int(dataset.caption_image[value])]
    key = "question_id" if task == "vqa" else "sent_id"
    for i, e in enumerate(dataset.entries):
        if e.get(key, i) == value:
            return i, e["image_id"]
    raise PictureError(f"--sample={value}: no {key} {value} in split {split!r}")


def _reading(task, output, batch, att, sample, split) -> tuple[list[str], dict, np.ndarray]:
    """(text lines, marked boxes, region weights) of the task's answer."""
    lines, marked, regions = task.attention_reading(output, batch, att)
    return [f"{task.name} {split}, sample {sample}"] + lines, marked, regions
