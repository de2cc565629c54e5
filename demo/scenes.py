"""Task-independent synthetic scenes for the embedded demo datasets.

Every demo task (VQA, visual grounding, image-text matching) is built from the
same kind of scene: a handful of coloured solids on a plain background, seen
through a fake bottom-up-attention detector.  The detector output mimics the
real ``coco_extract`` files: one 2048-d, non-negative, sparse-ish feature per
region plus a pixel box.  Attributes are recoverable from a region's feature
(the sum of per-attribute-value prototypes), but position is *not*: questions
about "left of" or "above" can only be answered from the boxes.

Everything here is deterministic given the ``np.random.Generator`` handed in;
the prototypes come from a fixed seed so the feature "semantics" are the same
for every build and every task.
"""

from __future__ import annotations

import functools
import itertools
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURE_DIM = 2048

COLOURS = ("red", "blue", "green", "yellow", "purple", "gray", "white", "black")
SHAPES = ("cube", "ball", "cylinder", "cone")
SIZES = ("small", "large")
MATERIALS = ("metal", "rubber")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "size": SIZES,
    "material": MATERIALS,
}

PROTOTYPE_SEED = 20200610  # fixed: feature semantics must not depend on a build seed
# Where an image-text demo image is set: its distractor regions carry the setting, its captions
# say it (demo/itm.py). Prototypes of these come after all others, which they leave unchanged.
SETTINGS = ("beach", "grass", "snow", "street", "kitchen", "table", "desk", "floor", "water", "forest")
PROTOTYPE_ACTIVE = 40      # non-zero dims per prototype (disjoint supports)
SPATIAL_MARGIN = 25.0      # px; centre offsets below this are "neither side"
NEAREST_GAP = 1.25         # runner-up must be this much farther to be "the" nearest

SIDE_RANGE = {"small": (38.0, 60.0), "large": (80.0, 115.0)}
ASPECT = {"cube": 1.0, "ball": 1.0, "cylinder": 1.35, "cone": 1.25}  # height / width
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
DIRECTIONS = tuple(_OPPOSITE)


@dataclass(frozen=True)
class Obj:
    """One solid in a scene; ``box`` is (x1, y1, x2, y2) in pixels."""

    colour: str
    shape: str
    size: str
    material: str
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    def attr(self, name: str) -> str:
        return getattr(self, name)


@dataclass
class Scene:
    """A synthetic image: its objects and the detector regions covering them.

    ``region_object[k]`` is the index into ``objects`` of the object region k
    was detected on, or -1 for background, part and context regions (which
    exist so a model has to attend rather than sum all regions).
    """

    image_id: int
    width: int
    height: int
    objects: list[Obj]
    regions_feat: np.ndarray  # [K, FEATURE_DIM] float32, >= 0
    regions_box: np.ndarray   # [K, 4] float32, (x1, y1, x2, y2)
    region_object: np.ndarray  # [K] int64


# --------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=1)
def prototypes() -> dict[str, np.ndarray]:
    """Sparse non-negative prototype per attribute value, plus object/background.

    Supports are disjoint so attribute values never blur into each other; keys
    are ``"colour=red"`` etc., ``"object"`` (shared by all solids),
    ``"background"`` and ``"setting=beach"`` etc.
    """
    rng = np.random.default_rng(PROTOTYPE_SEED)
    keys = [f"{a}={v}" for a, vals in ATTRIBUTES.items() for v in vals]
    keys += ["object", "background"]
    keys += [f"setting={v}" for v in SETTINGS]     # drawn last: the keys above stay as they were
    dims = rng.permutation(FEATURE_DIM)
    protos = {}
    for i, key in enumerate(keys):
        vec = np.zeros(FEATURE_DIM, np.float32)
        support = dims[i * PROTOTYPE_ACTIVE:(i + 1) * PROTOTYPE_ACTIVE]
        vec[support] = rng.uniform(1.0, 3.0, PROTOTYPE_ACTIVE)
        protos[key] = vec
    return protos


def object_signal(obj: Obj) -> np.ndarray:
    """Noise-free feature of an object: the sum of its attribute prototypes."""
    protos = prototypes()
    vec = protos["object"].copy()
    for name in ATTRIBUTES:
        vec += protos[f"{name}={obj.attr(name)}"]
    return vec


def noisy(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Jitter active dims a little and sprinkle weak clutter, like ReLU outputs.

    Noise stays far below the prototype values (1..3) so attributes remain
    cleanly recoverable; the clutter is sparse to keep files compressible.
    """
    out = signal * rng.normal(1.0, 0.1, FEATURE_DIM).astype(np.float32)
    clutter = rng.choice(FEATURE_DIM, 24, replace=False)
    out[clutter] += rng.exponential(0.2, 24).astype(np.float32)
    return np.clip(out, 0.0, None).astype(np.float32)


def partial(signal: np.ndarray, rng: np.random.Generator, keep: float) -> np.ndarray:
    """A weakened copy of an object's signal, as a detector sees a part of it."""
    mask = rng.random(FEATURE_DIM) < keep
    return signal * mask * np.float32(rng.uniform(0.35, 0.6))


# --------------------------------------------------------------------------- geometry


def overlaps(box: tuple, others: list[tuple], limit: float = 0.08) -> bool:
    """True if ``box`` covers more than ``limit`` of the smaller of it and any other."""
    x1, y1, x2, y2 = box
    for ox1, oy1, ox2, oy2 in others:
        iw = min(x2, ox2) - max(x1, ox1)
        ih = min(y2, oy2) - max(y1, oy1)
        if iw > 0 and ih > 0:
            small = min((x2 - x1) * (y2 - y1), (ox2 - ox1) * (oy2 - oy1))
            if iw * ih > limit * small:
                return True
    return False


def object_box(rng, size: str, shape: str, width: int, height: int) -> tuple:
    """A random box whose scale follows the size and whose aspect follows the shape."""
    w = rng.uniform(*SIDE_RANGE[size])
    h = w * ASPECT[shape] * rng.uniform(0.95, 1.05)
    x1 = rng.uniform(2.0, width - w - 2.0)
    y1 = rng.uniform(2.0, height - h - 2.0)
    return (float(x1), float(y1), float(x1 + w), float(y1 + h))


def _random_attrs(rng) -> dict[str, str]:
    return {name: vals[rng.integers(len(vals))] for name, vals in ATTRIBUTES.items()}


def place_objects(rng, width: int, height: int, n: int) -> list[Obj]:
    """Draw up to ``n`` objects at non-overlapping-ish positions (may place fewer)."""
    objects: list[Obj] = []
    for _ in range(n):
        attrs = _random_attrs(rng)
        for _attempt in range(60):
            box = object_box(rng, attrs["size"], attrs["shape"], width, height)
            if not overlaps(box, [o.box for o in objects]):
                objects.append(Obj(box=box, **attrs))
                break
    return objects


def clip_box(box, width: int, height: int) -> tuple:
    x1, y1, x2, y2 = box
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    return (x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0))


def extra_region(rng, objects: list[Obj], width: int, height: int):
    """One distractor region: background, a part of an object, or loose context."""
    kind = rng.choice(3, p=(0.4, 0.35, 0.25))
    bg = prototypes()["background"]
    if kind == 0:
        w, h = rng.uniform(0.3, 0.9) * width, rng.uniform(0.3, 0.9) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        return (x1, y1, x1 + w, y1 + h), noisy(bg * np.float32(rng.uniform(0.6, 1.2)), rng)
    obj = objects[rng.integers(len(objects))]
    x1, y1, x2, y2 = obj.box
    bw, bh = x2 - x1, y2 - y1
    if kind == 1:  # a part: sub-box of the object, weak partial feature
        fw, fh = rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.7)
        px, py = x1 + rng.uniform(0, 1 - fw) * bw, y1 + rng.uniform(0, 1 - fh) * bh
        box = (px, py, px + fw * bw, py + fh * bh)
        return box, noisy(partial(object_signal(obj), rng, 0.5), rng)
    pad = rng.uniform(0.3, 0.6)  # context: loose box, object diluted by background
    box = (x1 - pad * bw, y1 - pad * bh, x2 + pad * bw, y2 + pad * bh)
    feat = partial(object_signal(obj), rng, 0.6) + bg * np.float32(rng.uniform(0.4, 0.8))
    return box, noisy(feat, rng)


def make_scene(image_id: int, rng: np.random.Generator) -> Scene:
    """Draw one scene: 3-8 objects plus 2-6 distractor regions, shuffled."""
    width, height = int(rng.integers(500, 641)), int(rng.integers(375, 481))
    objects: list[Obj] = []
    while len(objects) < 3:
        objects = place_objects(rng, width, height, int(rng.integers(3, 9)))
    boxes = [o.box for o in objects]
    feats = [noisy(object_signal(o), rng) for o in objects]
    owner = list(range(len(objects)))
    for _ in range(int(rng.integers(2, 7))):
        box, feat = extra_region(rng, objects, width, height)
        boxes.append(clip_box(box, width, height))
        feats.append(feat)
        owner.append(-1)
    order = rng.permutation(len(boxes))
    return Scene(
        image_id=image_id,
        width=width,
        height=height,
        objects=objects,
        regions_feat=np.stack(feats)[order].astype(np.float32),
        regions_box=np.asarray(boxes, np.float32)[order],
        region_object=np.asarray(owner, np.int64)[order],
    )


def make_scenes(n: int, rng: np.random.Generator, first_image_id: int) -> list[Scene]:
    """``n`` scenes with consecutive image ids starting at ``first_image_id``."""
    return [make_scene(first_image_id + i, rng) for i in range(n)]


def write_feature_file(path, scene: Scene) -> None:
    """Write ``scene`` in the real bottom-up-attention ``.npz`` layout, atomically.

    Real files store ``x`` as [2048, K] (features along the first axis), so the
    loaders transpose; we keep that quirk so the same loader reads both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    arrays = {"x": np.ascontiguousarray(scene.regions_feat.T, dtype=np.float32),
              "bbox": scene.regions_box.astype(np.float32),
              "image_h": np.int64(scene.height), "image_w": np.int64(scene.width),
              "num_bbox": np.int64(len(scene.regions_box))}
    # np.savez_compressed's zlib level 6 was a third of a demo build; level 1 writes 2.4x
    # faster, files a third larger, the same arrays (np.load reads any level)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for key, a in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- language-free relations


def matching(objects: list[Obj], **attrs: str) -> list[int]:
    """Indices of the objects having all the given attribute values."""
    return [i for i, o in enumerate(objects) if all(o.attr(k) == v for k, v in attrs.items())]


def unique_descriptions(objects: list[Obj], idx: int, exclude=()) -> list[tuple[str, ...]]:
    """Attribute-name subsets (size 1-3) that pick out ``objects[idx]`` alone.

    ``exclude`` removes attributes that must not appear (e.g. the one a
    question asks about).
    """
    names = [n for n in ATTRIBUTES if n not in exclude]
    rows = [tuple(o.attr(n) for n in names) for o in objects]
    target = rows[idx]
    others = [r for j, r in enumerate(rows) if j != idx]
    found = []
    for k in range(1, min(3, len(names)) + 1):
        for combo in itertools.combinations(range(len(names)), k):
            if all(any(r[c] != target[c] for c in combo) for r in others):
                found.append(tuple(names[c] for c in combo))
    return found


def offset(a: Obj, b: Obj, direction: str) -> float:
    """How far ``a``'s centre lies from ``b``'s in ``direction`` (px, image y down)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[direction]


def relation(a: Obj, b: Obj, direction: str) -> bool | None:
    """Whether ``a`` is ``direction`` of ``b``; None when too close to call."""
    off = offset(a, b, direction)
    if abs(off) <= SPATIAL_MARGIN:
        return None
    return off > 0


def opposite(direction: str) -> str:
    return _OPPOSITE[direction]


def nearest_in_direction(objects: list[Obj], ref: int, direction: str) -> int | None:
    """The object clearly ``direction`` of ``objects[ref]`` and nearest to it.

    Returns None unless the answer is unambiguous: the winner must be closer
    (by centre distance) than the runner-up by a factor ``NEAREST_GAP``, and no
    borderline object (slightly in that direction, within the margin) may be
    comparably close.
    """
    r = objects[ref]
    rx, ry = r.centre

    def dist(o: Obj) -> float:
        return float(np.hypot(o.centre[0] - rx, o.centre[1] - ry))

    clear, borderline = [], []
    for i, o in enumerate(objects):
        if i == ref:
            continue
        off = offset(o, r, direction)
        if off > SPATIAL_MARGIN:
            clear.append((dist(o), i))
        elif off > 0:
            borderline.append(dist(o))
    if not clear:
        return None
    clear.sort()
    best = clear[0][0]
    rivals = [d for d, _ in clear[1:]] + borderline
    if any(d < NEAREST_GAP * best for d in rivals):
        return None
    return clear[0][1]


# --------------------------------------------------------------------------- phrasing (all tasks)


REL_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SYNONYMS = {"gray": ("grey",), "ball": ("sphere",), "cube": ("box", "block"), "cone": ("pyramid",),
             "large": ("big",), "small": ("tiny",), "metal": ("metallic", "shiny"), "rubber": ("plastic",)}


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def phrase(values: dict[str, str], rng, plural: bool = False) -> str:
    """Noun phrase like "small red metal cube" / "green objects" for attribute values."""
    words = [values[n] for n in ("size", "colour", "material") if n in values]
    noun = values.get("shape") or pick(rng, ("object", "thing"))
    return " ".join(words + [noun + ("s" if plural else "")])


def describe(objects, idx, rng, exclude=()) -> str | None:
    """A uniquely identifying phrase for ``objects[idx]``, or None if none exists."""
    combos = unique_descriptions(objects, idx, exclude)
    if not combos:
        return None
    combo = pick(rng, combos)
    return phrase({n: objects[idx].attr(n) for n in combo}, rng)
