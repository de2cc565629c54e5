"""Embedded synthetic Flickr30K image-text retrieval demo, in SCAN's real file formats.

The demo lets the retrieval pipeline (loader, search, training, R@K) run end to
end without Flickr30K and its bottom-up features.  The layout is the one SCAN's
``f30k_precomp`` release and Karpathy's split use::

    itm/f30k_precomp/{train,dev,test}_caps.txt   one caption per line, 5 per image
    itm/f30k_precomp/{train,dev,test}_ids.txt    train: one imgid per image,
                                                 dev/test: one imgid per caption line
    itm/id_mapping.json                          {"<imgid>": "<file name>.jpg"}
    itm/feats/<file name>.npz                    36 boxes per image, like the real features
    itm/packed/                                  the same features packed (pack_features.py),
                                                 which the loader reads when it is there

The ids files deliberately differ in form (as the real ones do), so a loader
has to accept both.  Images are the shared synthetic scenes (``scenes.py``)
seen through a fake detector with exactly 36 regions: each object gets a tight
box, one or two jittered copies and sometimes a part box; background, part and
context regions fill up the rest.  Features carry attributes, not position.

Captions are templated in five differently worded kinds (a single object, a
list, a spatial relation, a count, an attribute statement), each mentioning 1-3
objects, and together covering every object of the image.  Every image is set
somewhere (a beach, a kitchen, ...): its distractor regions carry the setting and
every caption ends by saying it, as Flickr captions name the scene ("... on the
beach .").  The setting is the pairing signal a network finds first (without it
the demo's networks stay at chance for ~200 steps: a caption's objects alone are
a weak signal against random negatives); the objects then tell apart images of
the same setting.  Images come in
families of 2-3 near-duplicates that differ in one attribute or one object's
position, and every family member has a caption showing that difference (the
changed attribute, or a relation of the moved object where one is clear), so
siblings (which share their setting) are hard negatives that only the right
details tell apart.

Run ``python3 -m demo.itm --root datasets/demo`` to build it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo import scenes as sc
from demo.build import built_once, cli, exclusive, resolve_sizes
from demo.scenes import REL_WORDS, SYNONYMS as _VQA_SYNONYMS, pick
from utils.io import atomic_write_text
from core.data.pack import pack
from core.data.packed import STORE_NAME, find_store
from core.tasks.itm.retrieval import chance_r1

VERSION = "itm-demo-2"
SPLITS = ("train", "dev", "test")
DEFAULT_SIZES = {"train": 1000, "dev": 100, "test": 100}  # images; ~5 ms each to write
CAPTIONS_PER_IMAGE = 5
NUM_BOXES = 36            # Flickr30K bottom-up features have 36 fixed boxes per image
MAX_OBJECTS = 6           # 5 captions of 1-3 mentions can always cover up to 6 objects
FAMILY_SIZES = (2, 3)
MIN_MOVE = 120.0          # px a moved object's centre travels between siblings
FEATURE_STEP = 1.0 / 16   # feature quantum (as in the VGD demo): keeps files small
SETTING_WORDS = {"beach": ("on the beach", "at the beach"), "grass": ("on the grass", "on a lawn"),
                 "snow": ("in the snow",), "street": ("on a street", "on the road"),
                 "kitchen": ("in a kitchen",), "table": ("on a table", "on a wooden table"),
                 "desk": ("on a desk",), "floor": ("on the floor",), "water": ("in the water",),
                 "forest": ("in a forest", "in the woods")}
SETTING_WEIGHT = (0.5, 1.0)   # a distractor region's setting prototype, times a uniform draw in this
CHANGES = {"colour": 0.35, "material": 0.15, "size": 0.15, "shape": 0.15, "position": 0.2}

# Words a caption may use for each attribute value: the VQA annotators' synonyms
# plus "little".  ``material_nouns`` are the forms that read after "made of".
SYNONYMS = {**_VQA_SYNONYMS, "small": ("tiny", "little")}
_MATERIAL_NOUNS = {"metal": ("metal",), "rubber": ("rubber", "plastic")}
_NUMBERS = {2: "two", 3: "three"}
_PHRASE_ORDER = ("size", "colour", "material")  # English adjective order before the noun


def attribute_words() -> dict[str, tuple[str, str]]:
    """Every caption word that names an attribute value -> (attribute, value).

    Plurals are not listed: strip "s"/"es" first.  Used by tests and by anyone
    checking captions against the scene.
    """
    out = {}
    for name, values in sc.ATTRIBUTES.items():
        for value in values:
            for word in (value, *SYNONYMS.get(value, ()), *_MATERIAL_NOUNS.get(value, ())):
                out[word] = (name, value)
    return out


@dataclass
class Caption:
    """One caption plus what it claims, for tests.

    ``mentions`` maps each mentioned object to the attributes its phrase shows;
    ``meta`` holds the claim a test can re-check: a relation (``a``, ``b``,
    ``direction``) or a count (``values``, ``count``).
    """

    text: str
    kind: str
    mentions: dict[int, tuple[str, ...]]
    meta: dict


@dataclass
class ItmImage:
    """One image: its scene, file name, family and five captions.

    ``variation`` is the family's difference (object index and the changed
    attribute or ``"position"``), or None for a family of one; ``setting`` is
    where the family is (a key of ``SETTING_WORDS``).
    """

    imgid: int
    file_name: str
    split: str
    family: int
    variation: dict | None
    width: int
    height: int
    objects: list[sc.Obj]
    setting: str
    captions: list[Caption]


# --------------------------------------------------------------------------- phrasing


def _word(value: str, rng) -> str:
    """The value itself most of the time, otherwise one of its synonyms."""
    options = SYNONYMS.get(value, ())
    return value if not options or rng.random() < 0.6 else pick(rng, options)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s")) else "s")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(values: dict[str, str], rng, plural: bool = False) -> str:
    """Bare phrase like "big red metal cube" / "shiny objects" with synonyms."""
    words = [_word(values[n], rng) for n in _PHRASE_ORDER if n in values]
    noun = _word(values["shape"], rng) if "shape" in values else pick(rng, ("object", "thing"))
    return " ".join(words + [_plural(noun) if plural else noun])


def _shown_attrs(rng, show=()) -> tuple[str, ...]:
    """Which attributes a mention shows: colour and shape usually, size and material
    sometimes, plus whatever ``show`` forces; never none at all."""
    names = {n for n, p in (("colour", 0.75), ("size", 0.4), ("material", 0.3), ("shape", 0.85))
             if rng.random() < p}
    names |= set(show)
    if not names - {"shape"}:
        names.add("shape")
    return tuple(n for n in sc.ATTRIBUTES if n in names)


def _mention(objects, idx, rng, show) -> tuple[str, tuple[str, ...]]:
    """"a large red cube" for ``objects[idx]`` and the attributes it shows."""
    names = _shown_attrs(rng, show.get(idx, ()))
    return _article(noun_phrase({n: objects[idx].attr(n) for n in names}, rng)), names


def _finish(text: str) -> str:
    """Flickr style: capitalised, tokens spaced, ending in " ."."""
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + ("" if text.endswith(" .") else " .")


def _join(phrases: list[str]) -> str:
    """"A", "A and B", "A , B and C" (punctuation spaced like the real captions)."""
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


# --------------------------------------------------------------------------- caption kinds
# Each returns a Caption or None when the scene does not allow one that mentions
# every object in ``must`` (and shows the attributes ``show`` asks for).


def _cap_single(objects, must, show, rng):
    """One object described with several attributes."""
    if len(must) > 1:
        return None
    idx = must[0] if must else int(rng.integers(len(objects)))
    forced = set(show.get(idx, ())) | set(rng.choice(("colour", "size", "material"), 2, replace=False))
    a_np, names = _mention(objects, idx, rng, {idx: tuple(forced)})
    template = pick(rng, ("{a}", "an image of {a}", "a picture showing {a}",
                           "there is {a} in the picture", "a photo of {a}"))
    return Caption(_finish(template.format(a=a_np)), "single", {idx: names}, {})


def _with_companions(objects, must, k, rng) -> list[int]:
    """``must`` plus random other objects up to ``k`` in all, shuffled."""
    others = [i for i in rng.permutation(len(objects)).tolist() if i not in must]
    chosen = list(must) + others[:max(0, k - len(must))]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _cap_list(objects, must, show, rng):
    """Two or three objects listed ("A red cube and a small blue ball .")."""
    k = max(len(must), int(rng.integers(2, 4)))
    chosen = _with_companions(objects, must, min(k, len(objects)), rng)
    if len(chosen) < 2:
        return None
    mentions, phrases = {}, []
    for i in chosen:
        a_np, mentions[i] = _mention(objects, i, rng, show)
        phrases.append(a_np)
    listed = _join(phrases)
    template = pick(rng, ("{l}", "a picture of {l}", "some objects : {l}")
                     if len(chosen) == 3 else ("{l}", "{l} together", "a picture of {l}"))
    return Caption(_finish(template.format(l=listed)), "list", mentions, {})


def _clear_pairs(objects, must) -> list[tuple[int, int, str]]:
    """(a, b, direction) with ``a`` clearly ``direction`` of ``b``, covering ``must``."""
    pairs = []
    for a in range(len(objects)):
        for b in range(len(objects)):
            if a == b or not set(must) <= {a, b}:
                continue
            pairs += [(a, b, d) for d in sc.DIRECTIONS if sc.relation(objects[a], objects[b], d) is True]
    return pairs


_REL_LEADING = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _cap_relation(objects, must, show, rng):
    """Two objects and where one lies from the other ("A cone to the left of a red ball .")."""
    pairs = _clear_pairs(objects, must) if len(must) <= 2 else []
    if not pairs:
        return None
    a, b, direction = pairs[int(rng.integers(len(pairs)))]
    (a_np, a_names), (b_np, b_names) = _mention(objects, a, rng, show), _mention(objects, b, rng, show)
    rel = pick(rng, REL_WORDS[direction])
    template = pick(rng, ("there is {a} {rel} {b}", "{a} {rel} {b}", "{a} is {rel} {b}", "{a} sits {rel} {b}",
                           "{lead} {b} there is {a}"))
    text = template.format(a=a_np, b=b_np, rel=rel, lead=_REL_LEADING[direction])
    return Caption(_finish(text), "relation", {a: a_names, b: b_names}, {"a": a, "b": b, "direction": direction})


_GROUP_KEYS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("material", "shape"))


def _count_groups(objects, must) -> list[tuple[dict, list[int], list[int]]]:
    """(values, members, extra) for groups of 2-3 objects that, with at most one extra
    object, mention every object in ``must`` and no more than three in all."""
    found, seen = [], set()
    for obj in objects:
        for keys in _GROUP_KEYS:
            values = {k: obj.attr(k) for k in keys}
            members = sc.matching(objects, **values)
            key = tuple(sorted(values.items()))
            extra = [i for i in must if i not in members]
            if key in seen or not 2 <= len(members) <= 3 or len(extra) > 3 - len(members) or len(extra) > 1:
                continue
            seen.add(key)
            found.append((values, members, extra))
    return found


def _cap_count(objects, must, show, rng):
    """An exact count: a group of 2-3 ("Two red cubes and a cone .") or, in a scene
    of three, every object ("Three objects : a yellow ball , a cube and a cone .")."""
    if show:
        return None
    if len(objects) == 3 and rng.random() < 0.5:
        mentions, phrases = {}, []
        for i in rng.permutation(3).tolist():
            a_np, mentions[i] = _mention(objects, i, rng, show)
            phrases.append(a_np)
        head = pick(rng, ("three objects :", "there are three objects :", "three things :"))
        return Caption(_finish(f"{head} {_join(phrases)}"), "count", mentions, {"values": {}, "count": 3})
    groups = _count_groups(objects, must)
    if not groups:
        return None
    values, members, extra = groups[int(rng.integers(len(groups)))]
    if not extra and len(members) == 2 and rng.random() < 0.4:
        extra = [i for i in rng.permutation(len(objects)).tolist() if i not in members][:1]
    group = f"{_NUMBERS[len(members)]} {noun_phrase(values, rng, plural=True)}"
    mentions = {i: tuple(values) for i in members}
    if extra:
        a_np, mentions[extra[0]] = _mention(objects, extra[0], rng, show)
        text = pick(rng, ("{g} and {a}", "{a} and {g}", "there are {g} and {a}")).format(g=group, a=a_np)
    else:
        text = pick(rng, ("{g}", "there are {g} in the picture", "there are {g}")).format(g=group)
    return Caption(_finish(text), "count", mentions, {"values": values, "count": len(members)})


def _predicate(obj: sc.Obj, asked: str, rng) -> str:
    """What an attribute statement says: "red", "big", "made of metal", "a cube"."""
    value = obj.attr(asked)
    if asked == "material":
        return "made of " + pick(rng, _MATERIAL_NOUNS[value])
    if asked == "shape":
        return _article(_word(value, rng))
    return _word(value, rng)


def _statement(objects, idx, rng, show) -> tuple[str, tuple[str, ...]] | None:
    """"the cube is red": a unique description of the object (not using the asked
    attribute) and the asked attribute, which ``show`` picks if it names one."""
    forced = show.get(idx, ())
    asked = forced[0] if forced else pick(rng, ("colour", "colour", "size", "material", "shape"))
    combos = sc.unique_descriptions(objects, idx, exclude=(asked,))
    if not combos:
        return None
    combo = combos[int(rng.integers(len(combos)))]
    desc = noun_phrase({n: objects[idx].attr(n) for n in combo}, rng)
    return f"the {desc} is {_predicate(objects[idx], asked, rng)}", tuple(combo) + (asked,)


def _cap_statement(objects, must, show, rng):
    """One or two attribute statements about uniquely described objects."""
    if len(must) > 2:
        return None
    targets = list(must) or [int(rng.integers(len(objects)))]
    if len(targets) == 1 and len(objects) > 1 and rng.random() < 0.35:
        targets = _with_companions(objects, targets, 2, rng)
    parts, mentions = [], {}
    for idx in targets:
        made = _statement(objects, idx, rng, show)
        if made is None:  # a must-mention fails the caption, an optional target is left out
            if idx in must:
                return None
            continue
        parts.append(made[0])
        mentions[idx] = tuple(n for n in sc.ATTRIBUTES if n in made[1])
    if not parts:
        return None
    return Caption(_finish(" and ".join(parts)), "statement", mentions, {})


_KINDS = {"single": _cap_single, "list": _cap_list, "relation": _cap_relation, "count": _cap_count,
          "statement": _cap_statement}
FOCUS_KINDS = {"attribute": ("single", "list", "relation", "statement"), "position": ("relation",)}


# --------------------------------------------------------------------------- captions of an image


def _must_mention(rng, n_objects: int, covered: set, slot: int, focus: int | None) -> list[int]:
    """Objects caption ``slot`` must mention so the five captions cover the scene.

    Each caption takes at least one uncovered object, and enough of them that the
    remaining slots can cover the rest one by one (at most 3 with 6 objects).
    """
    uncovered = [i for i in range(n_objects) if i not in covered and i != focus]
    left = len(uncovered) + (focus is not None and focus not in covered)
    need = max(1 if left else 0, left - (CAPTIONS_PER_IMAGE - 1 - slot))
    must = [] if focus is None else [focus]
    picked = rng.permutation(uncovered).tolist()
    return must + picked[:max(0, need - len(must))]


def _caption_for(objects, must, show, kinds, rng, taken: set) -> Caption:
    """The first new caption from ``kinds`` (in order), falling back to any kind.

    A list caption can always mention up to three given objects, so some kind
    always succeeds within a few redraws of the wording.
    """
    for _attempt in range(20):
        for kind in list(kinds) + ["list"]:
            cap = _KINDS[kind](objects, must, show, rng)
            if cap is not None and cap.text not in taken:
                return cap
    raise RuntimeError(f"no new caption for objects {must} of a {len(objects)}-object scene")


def make_captions(objects: list[sc.Obj], rng, variation: dict | None = None,
                  setting: str | None = None) -> list[Caption]:
    """Five distinct captions that together mention every object of the scene, each
    ending with where the scene is when a ``setting`` is given.

    Kinds are used in a random order so the five read differently; with a
    ``variation`` the first one mentions the varied object showing the varied
    attribute (or its position), so family members can be told apart.
    """
    order = [str(k) for k in rng.permutation(list(_KINDS))]
    captions, covered, taken = [], set(), set()
    for slot in range(CAPTIONS_PER_IMAGE):
        focus = variation["object"] if variation and slot == 0 else None
        must = _must_mention(rng, len(objects), covered, slot, focus)
        used = {c.kind for c in captions}
        kinds, show = [k for k in order if k not in used] + [k for k in order if k in used], {}
        if focus is not None:
            change = variation["change"]
            kinds = [str(k) for k in rng.permutation(FOCUS_KINDS["position" if change == "position" else "attribute"])]
            show = {} if change == "position" else {focus: (change,)}
        cap = _caption_for(objects, must, show, kinds, rng, taken)
        taken.add(cap.text)
        if setting is not None:
            cap.text = _finish(f"{cap.text[:-2]} {pick(rng, SETTING_WORDS[setting])}")
        captions.append(cap)
        covered |= set(cap.mentions)
    return [captions[i] for i in rng.permutation(CAPTIONS_PER_IMAGE)]


# --------------------------------------------------------------------------- families


def _base_layout(rng) -> tuple[int, int, list[sc.Obj]]:
    """Image size and 3-6 placed objects, drawn like ``scenes.make_scene``."""
    width, height = int(rng.integers(500, 641)), int(rng.integers(375, 481))
    objects: list[sc.Obj] = []
    while len(objects) < 3:
        objects = sc.place_objects(rng, width, height, int(rng.integers(3, MAX_OBJECTS + 1)))
    return width, height, objects


def _refit(rng, obj: sc.Obj, width: int, height: int, **attrs) -> sc.Obj:
    """``obj`` with new attributes; a new size or shape redraws its box around the
    same centre (scale and aspect must keep matching, as ``scenes`` draws them)."""
    new = dataclasses.replace(obj, **attrs)
    if "size" not in attrs and "shape" not in attrs:
        return new
    w = rng.uniform(*sc.SIDE_RANGE[new.size])
    h = w * sc.ASPECT[new.shape] * rng.uniform(0.95, 1.05)
    cx, cy = obj.centre
    x1 = float(np.clip(cx - w / 2, 2.0, width - w - 2.0))
    y1 = float(np.clip(cy - h / 2, 2.0, height - h - 2.0))
    return dataclasses.replace(new, box=(x1, y1, x1 + w, y1 + h))


def _moved(rng, obj: sc.Obj, others: list[sc.Obj], earlier: list[sc.Obj], width: int, height: int):
    """``obj`` at a free spot at least ``MIN_MOVE`` from its ``earlier`` positions."""
    for _attempt in range(100):
        box = sc.object_box(rng, obj.size, obj.shape, width, height)
        cand = dataclasses.replace(obj, box=box)
        far = all(np.hypot(cand.centre[0] - e.centre[0], cand.centre[1] - e.centre[1]) >= MIN_MOVE
                  for e in earlier)
        if far and not sc.overlaps(box, [o.box for o in others]):
            return cand
    return None


def _variants(rng, objects, j: int, change: str, n: int, width: int, height: int) -> list[sc.Obj]:
    """Up to ``n`` - 1 replacements of ``objects[j]`` differing from it and each other
    only in ``change``; a redrawn box must not overlap the other objects."""
    others = [o for i, o in enumerate(objects) if i != j]
    found = [objects[j]]
    if change == "position":
        for _ in range(n - 1):
            moved = _moved(rng, objects[j], others, found, width, height)
            if moved is not None:
                found.append(moved)
        return found[1:]
    values = [v for v in rng.permutation(sc.ATTRIBUTES[change]).tolist() if v != objects[j].attr(change)]
    for value in values:
        if len(found) == n:
            break
        cand = _refit(rng, objects[j], width, height, **{change: value})
        if not sc.overlaps(cand.box, [o.box for o in others]):
            found.append(cand)
    return found[1:]


def make_family(rng, n: int) -> tuple[int, int, list[list[sc.Obj]], dict | None]:
    """``n`` near-duplicate layouts (or fewer if no change fits): one base scene and
    siblings that replace one object with a variant.  Returns width, height, the
    object lists and the variation (None for a family of one)."""
    width, height, objects = _base_layout(rng)
    if n < 2:
        return width, height, [objects], None
    changes, weights = list(CHANGES), np.array(list(CHANGES.values()))
    for change in rng.choice(changes, len(changes), replace=False, p=weights / weights.sum()).tolist():
        j = int(rng.integers(len(objects)))
        variants = _variants(rng, objects, j, change, n, width, height)
        if variants:
            layouts = [objects] + [objects[:j] + [v] + objects[j + 1:] for v in variants]
            return width, height, layouts, {"object": j, "change": change}
    return width, height, [objects], None


# --------------------------------------------------------------------------- planning


def file_names(rng, n: int) -> list[str]:
    """``n`` unique random 8-10 digit "<number>.jpg" names, sorted as strings so
    imgids follow file names like Karpathy's Flickr30K split."""
    names: set[str] = set()
    while len(names) < n:
        digits = int(rng.choice((8, 9, 10), p=(0.15, 0.25, 0.6)))
        names.add(f"{int(rng.integers(10 ** (digits - 1), 10 ** digits))}.jpg")
    return sorted(names)


def _plan_split(split: str, n: int, rng, names: list[str], first_imgid: int, first_family: int):
    """The split's images, in families, shuffled so siblings are not adjacent."""
    drafts, family = [], first_family
    while len(drafts) < n:
        want = min(int(rng.choice(FAMILY_SIZES)), n - len(drafts))
        width, height, layouts, variation = make_family(rng, want)
        setting = pick(rng, sc.SETTINGS)
        for objects in layouts:
            drafts.append((family, variation, width, height, objects, setting,
                           make_captions(objects, rng, variation, setting)))
        family += 1
    drafts = [drafts[i] for i in rng.permutation(len(drafts))]
    images = []
    for k, (fam, variation, width, height, objects, setting, captions) in enumerate(drafts):
        imgid = first_imgid + k
        images.append(ItmImage(imgid, names[imgid], split, fam, variation, width, height, objects,
                               setting, captions))
    return images, family


def plan_demo(seed: int, sizes: dict) -> dict[str, list[ItmImage]]:
    """Every split's images with captions and generator metadata, no features.

    Imgids run from 0 over train, dev and test in order.
    """
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(1 + len(SPLITS))]
    names = file_names(streams[0], sum(sizes[s] for s in SPLITS))
    plan, first, family = {}, 0, 0
    for i, split in enumerate(SPLITS):
        plan[split], family = _plan_split(split, sizes[split], streams[1 + i], names, first, family)
        first += sizes[split]
    return plan


# --------------------------------------------------------------------------- features


def _jittered_box(rng, box) -> tuple:
    """A near-copy of ``box``: centre moved by <8 % of its size, sides scaled by <13 %."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * w, (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * h
    w, h = w * np.exp(rng.uniform(-0.12, 0.12)), h * np.exp(rng.uniform(-0.12, 0.12))
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _part_box(rng, box) -> tuple:
    """A 40-70 % sub-box of ``box``, as a detector fires on part of an object."""
    x1, y1, x2, y2 = box
    fw, fh = rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.7)
    px, py = x1 + rng.uniform(0, 1 - fw) * (x2 - x1), y1 + rng.uniform(0, 1 - fh) * (y2 - y1)
    return (px, py, px + fw * (x2 - x1), py + fh * (y2 - y1))


def _object_regions(rng, obj: sc.Obj) -> list[tuple[tuple, np.ndarray, bool]]:
    """(box, feature, is_object) for one object: a tight box, 1-2 jittered copies
    with slightly weaker full signal, and 0-1 part boxes with a partial one."""
    signal = sc.object_signal(obj)
    regions = [(obj.box, sc.noisy(signal, rng), True)]
    for _ in range(int(rng.integers(1, 3))):
        regions.append((_jittered_box(rng, obj.box), sc.noisy(signal * np.float32(rng.uniform(0.75, 1.0)), rng), True))
    if rng.random() < 0.5:
        regions.append((_part_box(rng, obj.box), sc.noisy(sc.partial(signal, rng, 0.5), rng), False))
    return regions


def make_regions(image: ItmImage, rng) -> sc.Scene:
    """The image's exactly-36-region detector output, shuffled, features quantised.

    Object regions first, then ``scenes``' background/part/context distractors
    up to 36, each with the image's setting added; features never encode position.
    """
    regions = []
    for k, obj in enumerate(image.objects):
        regions += [(box, feat, k if is_object else -1) for box, feat, is_object in _object_regions(rng, obj)]
    setting = sc.prototypes()[f"setting={image.setting}"]
    while len(regions) < NUM_BOXES:
        box, feat = sc.extra_region(rng, image.objects, image.width, image.height)
        regions.append((box, feat + setting * np.float32(rng.uniform(*SETTING_WEIGHT)), -1))
    boxes, feats, owner = zip(*regions)
    boxes = [sc.clip_box(b, image.width, image.height) for b in boxes]
    feats = np.round(np.stack(feats) / FEATURE_STEP) * FEATURE_STEP
    order = rng.permutation(NUM_BOXES)
    return sc.Scene(image_id=image.imgid, width=image.width, height=image.height, objects=image.objects,
                    regions_feat=feats[order].astype(np.float32),
                    regions_box=np.asarray(boxes, np.float32)[order],
                    region_object=np.asarray(owner, np.int64)[order])


def feature_path(root: Path, file_name: str) -> Path:
    """Where an image's features live: ``itm/feats/<file name>.npz``."""
    return Path(root) / "itm" / "feats" / f"{file_name}.npz"


def write_image_features(root: Path, image: ItmImage, seed: int) -> None:
    """Per-image generator, so one image's features can be redrawn alone."""
    rng = np.random.default_rng([seed, image.imgid, 1])
    sc.write_feature_file(feature_path(root, image.file_name), make_regions(image, rng))


# --------------------------------------------------------------------------- files and stats


def _lines(items) -> str:
    return "".join(f"{x}\n" for x in items)


def write_split(root: Path, split: str, images: list[ItmImage]) -> None:
    """``<split>_caps.txt`` and ``<split>_ids.txt``: train ids one per image,
    dev/test ids one per caption line, as in the real release."""
    folder = Path(root) / "itm" / "f30k_precomp"
    atomic_write_text(folder / f"{split}_caps.txt", _lines(c.text for im in images for c in im.captions))
    per = 1 if split == "train" else CAPTIONS_PER_IMAGE
    atomic_write_text(folder / f"{split}_ids.txt", _lines(im.imgid for im in images for _ in range(per)))


def _stats(plan: dict[str, list[ItmImage]]) -> dict:
    """Counts, caption length and mix, families and test chance-level R@1."""
    every = [im for s in SPLITS for im in plan[s]]
    caps = [c for im in every for c in im.captions]
    words = [sum(t not in {".", ",", ":"} for t in c.text.split()) for c in caps]
    chance = chance_r1([len(im.captions) for im in plan["test"]])
    return {
        "images": {s: len(plan[s]) for s in SPLITS},
        "captions": {s: len(plan[s]) * CAPTIONS_PER_IMAGE for s in SPLITS},
        "families": {s: len({im.family for im in plan[s]}) for s in SPLITS},
        "images_with_siblings": sum(im.variation is not None for im in every),
        "settings": len({im.setting for im in every}),
        "variations": dict(sorted(collections.Counter(
            im.variation["change"] for im in every if im.variation).items())),
        "caption_kinds": dict(sorted(collections.Counter(c.kind for c in caps).items())),
        "mean_caption_words": round(float(np.mean(words)), 2) if words else 0.0,
        **{name: round(value, 4) for name, value in chance.items()},
    }


def build_itm_demo(root: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the retrieval demo under ``root`` (see module doc) and return its stats.

    At once if ``root/itm/.demo_complete`` records the same version, seed and sizes.
    """
    root, sizes = Path(root), resolve_sizes(DEFAULT_SIZES, sizes)
    stats = built_once(root / "itm" / ".demo_complete", VERSION, seed, sizes,
                       lambda: _write_itm_demo(root, seed, sizes))
    if find_store([root / "itm" / "feats"], sc.FEATURE_DIM) is None:   # built before it had one
        with exclusive(root / "itm"):
            if find_store([root / "itm" / "feats"], sc.FEATURE_DIM) is None:
                _pack(root)
    return stats


def _pack(root: Path) -> None:
    """The features again as a packed float16 store (``pack_features.py``), which the loader
    then reads: ~1.9 ms to inflate a demo image's .npz is a quarter of a search's weight
    step at B = 32 (two images a sample). The demo's features are multiples of 1/16 below 5: exact in
    float16, so runs read the same numbers either way."""
    pack([root / "itm" / "feats"], root / "itm" / STORE_NAME, "float16", sc.FEATURE_DIM,
         overwrite=True, progress=False)


def _write_itm_demo(root: Path, seed: int, sizes: dict) -> dict:
    plan = plan_demo(seed, sizes)
    mapping = {}
    for split in SPLITS:
        for image in plan[split]:
            write_image_features(root, image, seed)
            mapping[str(image.imgid)] = image.file_name
        write_split(root, split, plan[split])
    ordered = {k: mapping[k] for k in sorted(mapping, key=int)}
    atomic_write_text(root / "itm" / "id_mapping.json", json.dumps(ordered))  # real file: default separators
    _pack(root)
    return _stats(plan)


def main(argv: list[str] | None = None) -> None:
    cli("Build the synthetic image-text retrieval demo dataset.", "itm", build_itm_demo, argv)


if __name__ == "__main__":
    main()
