"""Embedded synthetic visual-grounding (RefCOCO-style) demo, in the real file formats.

The demo lets the grounding pipeline (loader, search, training, Acc@0.5) run end to
end without RefCOCO and its 100-box bottom-up features.  Split files are flat JSON
lists with one entry per sentence (the refer toolkit's fields: tokens, image_id,
file_name, bbox in COCO ``[x, y, w, h]``, ...), and every image has a ``.npz`` with
exactly 100 proposals like the real VGD features.

Referring expressions are templated over the shared synthetic scenes
(``scenes.py``): by attributes ("the large blue ball", only when unique), by a
relation to another object ("the cube left of the red ball", nearest in that
direction) or as an extreme of a group ("leftmost ball"), the last two only when
unambiguous.  Proposals are jittered copies of the objects (tight, IoU 0.7-0.95;
loose, IoU 0.3-0.6) plus background boxes; a proposal's feature is the signal of
the object it overlaps most, scaled by that IoU, so the best box is findable from
features while spatial words still need the boxes.  ``testA``/``testB`` mimic
RefCOCO's people/objects split: they refer only to balls and cubes, or only to
cylinders and cones.

Run ``python3 -m demo.vgd --root datasets/demo`` to build it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from demo import scenes as sc
from demo.build import built_once, cli, resolve_sizes
from demo.scenes import REL_WORDS, describe, phrase, pick
from utils.io import atomic_write_json
from core.tasks.vgd import proposal_baselines
from core.tasks.vgd.boxes import clip_boxes, iou, xywh_to_xyxy

VERSION = "vgd-demo-1"
SPLITS = ("train", "val", "testA", "testB")
# Images per split.  Each costs ~7 ms, mostly zlib on its 100x2048 features (numpy's
# fixed level), so ~1,200 images keep the build under 10 s and ~35 MB.
DEFAULT_SIZES = {"train": 900, "val": 150, "testA": 75, "testB": 75}
FILE_PREFIX = "COCO_train2014_"  # RefCOCO images all come from COCO train2014
TARGET_SHAPES = {"testA": ("ball", "cube"), "testB": ("cylinder", "cone")}

NUM_PROPOSALS = 100
TIGHT_IOU = (0.7, 0.95)   # upper bound keeps proposals off the GT: regression has work
LOOSE_IOU = (0.3, 0.6)
BACKGROUND_IOU = 0.25     # proposals below this IoU with every object are background
FEATURE_STEP = 1.0 / 16   # feature quantum: keeps the compressed files small
CLUTTER_DIMS = 8

# Expression kinds and how often each is attempted; the spatial ones fail more
# often (ambiguous layouts), so they are tried a bit above the ~40 % they yield.
KIND_WEIGHTS = {"attr": 0.45, "relation": 0.33, "extreme": 0.22}
SPATIAL_KINDS = ("relation", "extreme")

_EXTREME_WORDS = {
    "left": ("leftmost", "left"),
    "right": ("rightmost", "right"),
    "above": ("top", "topmost", "highest"),
    "below": ("bottom", "lowest"),
}
_EXTREME_SIDE = {"left": "on the left", "right": "on the right", "above": "at the top",
                 "below": "at the bottom"}


@dataclass
class VgdImage:
    """One image of the demo: its objects, 100 proposals and sentence records.

    ``records`` carry private ``_target``/``_meta`` fields (stripped before
    writing) so tests can check spatial expressions against the boxes.
    """

    image_id: int
    width: int
    height: int
    objects: list[sc.Obj]
    gt_xyxy: np.ndarray    # [n_objects, 4] float64, inclusive, from the written bboxes
    proposals: np.ndarray  # [100, 4] float32 (x1, y1, x2, y2)
    records: list[dict]


# --------------------------------------------------------------------------- expressions
# Each generator returns (text, meta) or None when the scene does not allow an
# unambiguous expression of that kind for the target.


def _ref_attr(objects, idx, rng):
    """The target by a unique attribute phrase ("the large blue ball")."""
    np_ = describe(objects, idx, rng)
    if np_ is None:
        return None
    return pick(rng, ("the {np}", "{np}")).format(np=np_), {"kind": "attr"}


def _noun_filter(obj: sc.Obj, rng) -> dict[str, str]:
    """Attributes naming the target's group: its shape (usually) or nothing ("object")."""
    return {"shape": obj.shape} if rng.random() < 0.65 else {}


def _ref_relation(objects, idx, rng):
    """The target as the nearest group member in a direction of a unique referent.

    "the cube left of the red ball" means: of the cubes, the one clearly left of
    the red ball and nearest to it (``nearest_in_direction`` over that group).
    """
    direction = pick(rng, sc.DIRECTIONS)
    values = _noun_filter(objects[idx], rng)
    group = sc.matching(objects, **values)
    for ref in (int(r) for r in rng.permutation(len(objects))):
        if ref == idx:
            continue
        sub = sorted(set(group) | {ref})
        winner = sc.nearest_in_direction([objects[i] for i in sub], sub.index(ref), direction)
        if winner is None or sub[winner] != idx:
            continue
        ref_np = describe(objects, ref, rng)
        if ref_np is None:
            continue
        head = pick(rng, ("the ", "")) + phrase(values, rng)
        text = f"{head} {pick(rng, REL_WORDS[direction])} the {ref_np}"
        return text, {"kind": "relation", "ref": ref, "direction": direction, "group": group}
    return None


def _ref_extreme(objects, idx, rng):
    """The target as the extreme of a group of at least two ("leftmost ball").

    Unambiguous only when the target is clearly (beyond the spatial margin) in
    that direction of every other group member.
    """
    direction = pick(rng, sc.DIRECTIONS)
    target = objects[idx]
    options = ((), ("shape",), ("colour",), ("colour", "shape"))
    for names in (options[int(k)] for k in rng.permutation(len(options))):
        values = {n: target.attr(n) for n in names}
        group = sc.matching(objects, **values)
        if len(group) < 2:
            continue
        if all(sc.relation(target, objects[j], direction) is True for j in group if j != idx):
            np_ = phrase(values, rng)
            if rng.random() < 0.7:
                text = f"{pick(rng, ('the ', ''))}{pick(rng, _EXTREME_WORDS[direction])} {np_}"
            else:
                text = f"the {np_} {_EXTREME_SIDE[direction]}"
            return text, {"kind": "extreme", "direction": direction, "group": group}
    return None


_GENERATORS = {"attr": _ref_attr, "relation": _ref_relation, "extreme": _ref_extreme}


def expressions(objects: list[sc.Obj], idx: int, rng: np.random.Generator, n: int) -> list[dict]:
    """Up to ``n`` distinct expressions for ``objects[idx]``: ``{"tokens", "meta"}`` each."""
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    weights = weights / weights.sum()
    out, seen = [], set()
    for _ in range(n * 8):
        if len(out) == n:
            break
        made = _GENERATORS[kinds[int(rng.choice(len(kinds), p=weights))]](objects, idx, rng)
        if made is None or made[0] in seen:
            continue
        seen.add(made[0])
        out.append({"tokens": made[0].lower().split(), "meta": made[1]})
    return out


def refer(objects: list[sc.Obj], rng: np.random.Generator, shapes=None) -> list[tuple[int, list[dict]]]:
    """1-3 referred objects (of ``shapes`` if given), each with 2-3 expressions."""
    candidates = [i for i, o in enumerate(objects) if shapes is None or o.shape in shapes]
    want = int(rng.integers(1, 4))
    refs = []
    for idx in (int(i) for i in rng.permutation(candidates)):
        if len(refs) == want:
            break
        exprs = expressions(objects, idx, rng, int(rng.integers(2, 4)))
        if len(exprs) >= 2:
            refs.append((idx, exprs))
    return refs


# --------------------------------------------------------------------------- proposals


def coco_bbox(obj: sc.Obj) -> list[float]:
    """COCO ``[x, y, w, h]`` of an object, inclusive (``x2 = x + w - 1``), 2 decimals."""
    x1, y1, x2, y2 = obj.box
    return [round(x1, 2), round(y1, 2), round(x2 - x1 + 1, 2), round(y2 - y1 + 1, 2)]


def _iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``core.tasks.vgd.boxes.iou`` on numpy arrays (float64, so sampling bounds are exact)."""
    return iou(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    return clip_boxes(torch.from_numpy(boxes), height, width).numpy()


def _jittered(rng, gts: np.ndarray, n: int, shift: float, scale: float, width: int, height: int):
    """[n_objects, n, 4] boxes around each of ``gts``: centres moved by up to ``shift``
    of the object's size, sides scaled by up to ``exp(scale)``."""
    x1, y1, x2, y2 = (gts[:, k, None] for k in range(4))
    w, h = x2 - x1 + 1, y2 - y1 + 1
    shape = (len(gts), n)
    cx = x1 + w / 2 + rng.uniform(-shift, shift, shape) * w
    cy = y1 + h / 2 + rng.uniform(-shift, shift, shape) * h
    nw = w * np.exp(rng.uniform(-scale, scale, shape))
    nh = h * np.exp(rng.uniform(-scale, scale, shape))
    boxes = np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2 - 1, cy + nh / 2 - 1], -1)
    return _clip(boxes, width, height).astype(np.float32)  # the stored precision decides the IoU


def _in_band(boxes: np.ndarray, gts: np.ndarray, band: tuple[float, float], counts) -> list[np.ndarray]:
    """Per object, the first ``counts[i]`` of its boxes whose IoU with it lies in ``band``."""
    ious = _iou_np(boxes, gts[:, None, :])[..., 0]
    keep = (ious >= band[0]) & (ious <= band[1])
    return [boxes[i][keep[i]][:k] for i, k in enumerate(counts)]


def _object_proposals(rng, gts: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    """2-4 tight and 2-3 loose boxes per object; at least one tight box always.

    A 3 %-per-side shrunk copy (IoU ~0.88, never the GT itself) ends each
    object's tight candidates, so an unlucky draw still leaves a proposal with
    IoU >= 0.5.
    """
    w, h = gts[:, 2] - gts[:, 0] + 1, gts[:, 3] - gts[:, 1] + 1
    shrunk = gts + 0.03 * np.stack([w, h, -w, -h], -1)
    tight = np.concatenate([_jittered(rng, gts, 24, 0.08, 0.15, width, height),
                            shrunk[:, None].astype(np.float32)], 1)
    loose = _jittered(rng, gts, 24, 0.35, 0.55, width, height)
    n = len(gts)
    return (_in_band(tight, gts, TIGHT_IOU, rng.integers(2, 5, n))
            + _in_band(loose, gts, LOOSE_IOU, rng.integers(2, 4, n)))


def _background_proposals(rng, gts: np.ndarray, n: int, width: int, height: int) -> np.ndarray:
    """``n`` boxes of 8-90 % of the image overlapping every object by IoU < 0.25."""
    found: list[np.ndarray] = []
    while sum(len(f) for f in found) < n:
        w = rng.uniform(0.08, 0.9, 4 * n) * width
        h = rng.uniform(0.08, 0.9, 4 * n) * height
        x1 = rng.uniform(0, 1, 4 * n) * (width - w)
        y1 = rng.uniform(0, 1, 4 * n) * (height - h)
        boxes = _clip(np.stack([x1, y1, x1 + w - 1, y1 + h - 1], -1), width, height).astype(np.float32)
        found.append(boxes[_iou_np(boxes, gts).max(1) < BACKGROUND_IOU])
    return np.concatenate(found)[:n]


def make_proposals(rng, gts: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exactly 100 shuffled proposals [100, 4] float32 for objects with boxes ``gts``."""
    boxes = np.concatenate(_object_proposals(rng, gts, width, height))[:NUM_PROPOSALS]
    background = _background_proposals(rng, gts, NUM_PROPOSALS - len(boxes), width, height)
    boxes = np.concatenate([boxes, background])
    return boxes[rng.permutation(NUM_PROPOSALS)].astype(np.float32)


def _scatter(out_t: np.ndarray, rows: np.ndarray, signal: np.ndarray, gains: np.ndarray, rng) -> None:
    """Add ``signal`` x ``gains[i]`` x N(1, 0.1) to proposal ``rows[i]`` of ``out_t``
    ([2048, K]) on the signal's support only: sparse, so cheap for 100 proposals."""
    dims = np.flatnonzero(signal)
    values = signal[dims] * gains[:, None] * rng.normal(1.0, 0.1, (len(rows), len(dims)))
    out_t[dims[None, :], rows[:, None]] += values.astype(np.float32)


def proposal_features(rng, objects: list[sc.Obj], gts: np.ndarray, proposals: np.ndarray):
    """Features [2048, K] float32 (the stored layout): best-overlapped object's signal
    scaled by that IoU, or the background prototype below ``BACKGROUND_IOU``.

    Multiplicative jitter on the active dims and a little sparse clutter play the
    detector noise; values are rounded to ``FEATURE_STEP`` so the 100x2048 arrays
    compress well.  Nothing here depends on position.
    """
    ious = _iou_np(proposals, gts)
    owner, overlap = ious.argmax(1), ious.max(1)
    owner[overlap < BACKGROUND_IOU] = -1
    out_t = np.zeros((sc.FEATURE_DIM, len(proposals)), np.float32)
    for k, obj in enumerate(objects):
        rows = np.flatnonzero(owner == k)
        _scatter(out_t, rows, sc.object_signal(obj), overlap[rows], rng)
    rows = np.flatnonzero(owner == -1)
    _scatter(out_t, rows, sc.prototypes()["background"], rng.uniform(0.6, 1.2, len(rows)), rng)
    cols = np.repeat(np.arange(len(proposals)), CLUTTER_DIMS)
    dims = rng.integers(0, sc.FEATURE_DIM, len(cols))
    np.add.at(out_t, (dims, cols), rng.exponential(0.2, len(cols)).astype(np.float32))
    np.clip(out_t, 0.0, None, out=out_t)
    return (np.round(out_t / FEATURE_STEP) * FEATURE_STEP).astype(np.float32)


# --------------------------------------------------------------------------- images and records


def _image_rng(seed: int, image_id: int, stream: int) -> np.random.Generator:
    """Per-image generator: features can be redrawn for one image without the rest."""
    return np.random.default_rng([seed, image_id, stream])


def file_name(image_id: int) -> str:
    return f"{FILE_PREFIX}{image_id:012d}.jpg"


def feature_path(root: Path, image_id: int) -> Path:
    """Where an image's 100-proposal features live (real naming scheme)."""
    return Path(root) / "vgd" / "feats" / f"{file_name(image_id)}.npz"


def _make_image(image_id: int, split: str, seed: int) -> VgdImage:
    """Draw scenes until one has referable targets, then its proposals and sentences.

    ``records`` get ``ref_id``/``sent_id`` later, when the split order is known.
    """
    rng = _image_rng(seed, image_id, 0)
    refs = []
    while not refs:
        scene = sc.make_scene(image_id, rng)
        refs = refer(scene.objects, rng, TARGET_SHAPES.get(split))
    bboxes = [coco_bbox(o) for o in scene.objects]
    gts = xywh_to_xyxy(torch.tensor(bboxes, dtype=torch.float64)).numpy()
    proposals = make_proposals(rng, gts, scene.width, scene.height)
    records = []
    for idx, exprs in refs:
        for e in exprs:
            records.append({
                "tokens": e["tokens"], "image_id": image_id, "file_name": file_name(image_id),
                "split": split, "bbox": bboxes[idx], "name": scene.objects[idx].shape,
                "height": scene.height, "width": scene.width, "ref_id": -1, "sent_id": -1,
                "sent": " ".join(e["tokens"]), "_target": idx, "_meta": e["meta"]})
    return VgdImage(image_id, scene.width, scene.height, scene.objects, gts, proposals, records)


def _first_ids(sizes: dict) -> dict[str, int]:
    """First image id of each split; splits start on separate 100k blocks."""
    first, out = 1, {}
    for split in SPLITS:
        out[split] = first
        first = ((first + sizes[split] - 1) // 100_000 + 1) * 100_000 + 1
    return out


def plan_demo(seed: int, sizes: dict) -> dict[str, list[VgdImage]]:
    """Every split's images, proposals and records (with private fields), no features.

    ``ref_id`` numbers referred objects and ``sent_id`` sentences, both over all
    splits in order, as in the refer toolkit.
    """
    first = _first_ids(sizes)
    plan = {s: [_make_image(first[s] + i, s, seed) for i in range(sizes[s])] for s in SPLITS}
    ref_id, sent_id, last = -1, 0, None
    for split in SPLITS:
        for image in plan[split]:
            for rec in image.records:
                key = (image.image_id, rec["_target"])
                ref_id += key != last
                rec["ref_id"], rec["sent_id"], last = ref_id, sent_id, key
                sent_id += 1
    return plan


def strip_private(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


def write_image_features(root: Path, image: VgdImage, seed: int) -> None:
    """The image's ``.npz`` in the real layout (via ``scenes.write_feature_file``).

    Features are made as [2048, K], so the writer's transpose back is a free view.
    """
    feats_t = proposal_features(_image_rng(seed, image.image_id, 1), image.objects, image.gt_xyxy,
                              image.proposals)
    scene = sc.Scene(image_id=image.image_id, width=image.width, height=image.height,
                     objects=image.objects, regions_feat=feats_t.T, regions_box=image.proposals,
                     region_object=np.full(NUM_PROPOSALS, -1, np.int64))
    sc.write_feature_file(feature_path(root, image.image_id), scene)


# --------------------------------------------------------------------------- stats


def _stats(plan: dict[str, list[VgdImage]]) -> dict:
    """Counts per split, expression-kind mix and the two val baselines."""
    records = {s: [r for im in plan[s] for r in im.records] for s in SPLITS}
    every = [r for recs in records.values() for r in recs]
    kinds = collections.Counter(r["_meta"]["kind"] for r in every)
    rand, largest = proposal_baselines(records["val"], {im.image_id: im.proposals for im in plan["val"]})
    return {
        "images": {s: len(plan[s]) for s in SPLITS},
        "refs": {s: len({r["ref_id"] for r in records[s]}) for s in SPLITS},
        "sentences": {s: len(records[s]) for s in SPLITS},
        "kinds": dict(sorted(kinds.items())),
        "spatial_fraction": round(sum(kinds[k] for k in SPATIAL_KINDS) / max(1, len(every)), 4),
        "random_proposal_acc_val": round(rand, 2),
        "largest_proposal_acc_val": round(largest, 2),
    }


# --------------------------------------------------------------------------- build


def build_vgd_demo(root: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the grounding demo under ``root`` (see module doc) and return its stats.

    At once if ``root/vgd/demo/.demo_complete`` records the same version, seed and sizes.
    """
    root, sizes = Path(root), resolve_sizes(DEFAULT_SIZES, sizes)
    return built_once(root / "vgd" / "demo" / ".demo_complete", VERSION, seed, sizes,
                      lambda: _write_vgd_demo(root, seed, sizes))


def _write_vgd_demo(root: Path, seed: int, sizes: dict) -> dict:
    plan = plan_demo(seed, sizes)
    for split in SPLITS:
        for image in plan[split]:
            write_image_features(root, image, seed)
        records = [r for image in plan[split] for r in image.records]
        atomic_write_json(root / "vgd" / "demo" / f"{split}.json", strip_private(records),
                          compact=True)
    return _stats(plan)


def main(argv: list[str] | None = None) -> None:
    cli("Build the synthetic visual-grounding demo dataset.", "vgd/demo", build_vgd_demo, argv)


if __name__ == "__main__":
    main()
