"""Embedded synthetic VQA-v2 demo dataset, written in the exact real file formats.

The demo lets the whole pipeline (loaders, search, training, official-style
evaluation) run end to end without the 70 GB of real data: question and
annotation JSONs follow the VQA v2 schemas (including the info/license fields
the official evaluator expects), a VG pair reuses train images like the real
VG-VQA split does, and region features are ``coco_extract`` ``.npz`` files.

Questions are templated over synthetic scenes (see ``scenes.py``): counting
(number), existence and spatial yes/no (yes/no), attribute and spatial queries
(other).  The answer vocabulary is small (~25 answers) so a tiny model can
learn it in minutes; ten noisy annotators per question exercise the
leave-one-out accuracy and answer normalisation.

Run ``python3 -m demo.vqa --root datasets/demo`` to build it.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import numpy as np

from demo import scenes as sc
from demo.build import built_once, cli, resolve_sizes
from demo.scenes import REL_WORDS, SYNONYMS, describe, phrase, pick
from utils.io import atomic_write_json
from core.tasks.vqa import majority_baseline
from core.tasks.vqa.evaluation import MANUAL_MAP, normalize_result_answer

VERSION = "vqa-demo-1"
DEFAULT_SIZES = {
    "train": 1500,   # images
    "val": 300,
    "test": 200,
    "vg": 300,       # train images that also get VG questions
    "min_questions": 6,
    "max_questions": 8,
}
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015"}
FEATURE_PREFIX = {"train": "COCO_train2014_", "val": "COCO_val2014_", "test": "COCO_test2015_"}
VG_QID_OFFSET = 500  # VG question ids are image_id*1000 + 500 + k: never collide with VQA's

# Question kinds and how often each is attempted; spatial generators fail more
# often (ambiguous layouts), so their weights are set above the ~28 % they yield.
KIND_WEIGHTS = {
    "count": 0.20,
    "exist": 0.21,
    "attr": 0.23,
    "spatial_query": 0.20,
    "spatial_yesno": 0.16,
}
SPATIAL_KINDS = ("spatial_query", "spatial_yesno")
MAX_COUNT = 6

_INFO = {
    "description": "MMNas synthetic demo of the VQA v2 dataset (templated questions "
                   "over synthetic scenes).",
    "url": "",
    "version": "2.0",
    "year": 2017,
    "contributor": "mmnas demo generator",
    "date_created": "2017-04-26 17:00:44",
}
_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
            "name": "Creative Commons Attribution 4.0 International License"}

# --------------------------------------------------------------------------- phrasing


_ASK_ATTR = {
    "colour": ("What color is the {np}?", "What is the color of the {np}?", "Which color is the {np}?"),
    "shape": ("What shape is the {np}?", "What is the shape of the {np}?"),
    "size": ("What size is the {np}?", "How big is the {np}?"),
    "material": ("What material is the {np} made of?", "What is the {np} made of?"),
}
_ASK_SPATIAL = {
    "colour": ("What color is the object {rel} the {ref}?", "What is the color of the thing {rel} the {ref}?"),
    "shape": ("What shape is {rel} the {ref}?", "What shape is the object {rel} the {ref}?"),
    "size": ("What size is the object {rel} the {ref}?",),
    "material": ("What material is the thing {rel} the {ref}?",),
}


_QUESTION_TYPES = {"what color is the", "what is the color", "which color is the", "what shape is the",
                   "what is the shape", "what size is the", "how big is the", "what material is the",
                   "what is the", "how many", "is there a", "do you see a", "are there any", "are there",
                   "is the", "what shape is", "what color is"}


def _question_type(text: str) -> str:
    """VQA-style question_type: the leading words of the question, lower-cased."""
    words = text.rstrip("?").lower().split()
    for n in (4, 3, 2):
        head = " ".join(words[:n])
        if head in _QUESTION_TYPES:
            return head
    return " ".join(words[:2])


# --------------------------------------------------------------------------- question generators
# Each returns (question, answer, answer_type, meta) or None when the scene does
# not allow an unambiguous question of that kind.


def _q_count(objects, rng):
    """How many objects match a 0-2 attribute filter (answers 0..6)."""
    n_attrs = int(rng.choice(3, p=(0.1, 0.6, 0.3)))
    names = list(rng.choice(list(sc.ATTRIBUTES), n_attrs, replace=False))
    if rng.random() < 0.8:
        src = objects[int(rng.integers(len(objects)))]
        values = {n: src.attr(n) for n in names}
    else:
        values = {n: pick(rng, sc.ATTRIBUTES[n]) for n in names}
    count = len(sc.matching(objects, **values))
    if count > MAX_COUNT:
        return None
    np_ = phrase(values, rng, plural=True)
    text = pick(rng, ("How many {np} are there?", "How many {np} are in the picture?",
                       "How many {np} can you see?", "How many {np} are in the image?")).format(np=np_)
    return text, str(count), "number", {"kind": "count", "filter": values}


def _absent_values(objects, rng, names):
    """Attribute values (for ``names``) that no object has; near-misses half the time."""
    for _ in range(20):
        if rng.random() < 0.5:
            src = objects[int(rng.integers(len(objects)))]
            values = {n: src.attr(n) for n in names}
            flip = pick(rng, names)
            values[flip] = pick(rng, [v for v in sc.ATTRIBUTES[flip] if v != values[flip]])
        else:
            values = {n: pick(rng, sc.ATTRIBUTES[n]) for n in names}
        if not sc.matching(objects, **values):
            return values
    return None


def _q_exist(objects, rng):
    """Is there an object matching 1-3 attributes; answer balanced yes/no."""
    names = list(rng.choice(list(sc.ATTRIBUTES), int(rng.integers(1, 4)), replace=False))
    if rng.random() < 0.5:
        src = objects[int(rng.integers(len(objects)))]
        values, answer = {n: src.attr(n) for n in names}, "yes"
    else:
        values, answer = _absent_values(objects, rng, names), "no"
        if values is None:
            return None
    if rng.random() < 0.4:
        np_ = phrase(values, rng, plural=True)
        text = pick(rng, ("Are there any {np}?", "Are there any {np} in the picture?")).format(np=np_)
    else:
        np_ = phrase(values, rng)
        text = pick(rng, ("Is there a {np}?", "Is there a {np} in the image?",
                           "Do you see a {np}?")).format(np=np_)
    return text, answer, "yes/no", {"kind": "exist", "filter": values}


def _asked_attr(rng) -> str:
    return str(rng.choice(list(sc.ATTRIBUTES), p=(0.35, 0.3, 0.15, 0.2)))


def _q_attr(objects, rng):
    """An attribute of a uniquely described object (described without that attribute)."""
    idx = int(rng.integers(len(objects)))
    asked = _asked_attr(rng)
    np_ = describe(objects, idx, rng, exclude=(asked,))
    if np_ is None:
        return None
    text = pick(rng, _ASK_ATTR[asked]).format(np=np_)
    return text, objects[idx].attr(asked), "other", {"kind": "attr", "target": idx, "asked": asked}


def _q_spatial_query(objects, rng):
    """An attribute of the nearest object in a direction from a unique referent."""
    ref = int(rng.integers(len(objects)))
    direction = pick(rng, sc.DIRECTIONS)
    target = sc.nearest_in_direction(objects, ref, direction)
    if target is None:
        return None
    ref_np = describe(objects, ref, rng)
    if ref_np is None:
        return None
    asked = _asked_attr(rng)
    text = pick(rng, _ASK_SPATIAL[asked]).format(rel=pick(rng, REL_WORDS[direction]), ref=ref_np)
    meta = {"kind": "spatial_query", "ref": ref, "target": target, "direction": direction, "asked": asked}
    return text, objects[target].attr(asked), "other", meta


def _q_spatial_yesno(objects, rng):
    """Whether one unique object lies in a direction of another; balanced yes/no."""
    a, b = (int(i) for i in rng.choice(len(objects), 2, replace=False))
    direction = pick(rng, sc.DIRECTIONS)
    truth = sc.relation(objects[a], objects[b], direction)
    if truth is None:
        return None
    a_np, b_np = describe(objects, a, rng), describe(objects, b, rng)
    if a_np is None or b_np is None:
        return None
    if (rng.random() < 0.5) != truth:  # flip the direction to hit the drawn answer
        direction, truth = sc.opposite(direction), not truth
    if direction in ("left", "right") and rng.random() < 0.3:
        text = f"Is the {a_np} on the {direction} side of the {b_np}?"
    else:
        text = f"Is the {a_np} {pick(rng, REL_WORDS[direction])} the {b_np}?"
    meta = {"kind": "spatial_yesno", "a": a, "b": b, "direction": direction}
    return text, "yes" if truth else "no", "yes/no", meta


_GENERATORS = {
    "count": _q_count,
    "exist": _q_exist,
    "attr": _q_attr,
    "spatial_query": _q_spatial_query,
    "spatial_yesno": _q_spatial_yesno,
}


def generate_questions(objects: list, rng: np.random.Generator, n: int) -> list[dict]:
    """Up to ``n`` distinct templated questions about a scene's objects.

    Each item has ``question``, ``answer`` (the truth), ``answer_type``,
    ``question_type`` and ``meta`` (kind plus the object indices involved, so
    tests can check answers against the boxes).
    """
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    weights = weights / weights.sum()
    out, seen = [], set()
    for _ in range(n * 10):
        if len(out) == n:
            break
        made = _GENERATORS[kinds[int(rng.choice(len(kinds), p=weights))]](objects, rng)
        if made is None or made[0] in seen:
            continue
        text, answer, answer_type, meta = made
        seen.add(text)
        out.append({"question": text, "answer": answer, "answer_type": answer_type,
                    "question_type": _question_type(text), "meta": meta})
    return out


# --------------------------------------------------------------------------- annotators

_DIGIT_WORDS = {v: k for k, v in MANUAL_MAP.items() if k != "none"}


def _category(answer: str) -> tuple[str, ...]:
    for vals in sc.ATTRIBUTES.values():
        if answer in vals:
            return vals
    return ()


def _wrong_answer(truth: str, rng) -> str:
    """A plausible mistake: adjacent number, the other yes/no, another value or a synonym."""
    if truth.isdigit():
        n = int(truth)
        return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
    if truth in ("yes", "no"):
        return "no" if truth == "yes" else "yes"
    options = [v for v in _category(truth) if v != truth] + list(SYNONYMS.get(truth, ()))
    return pick(rng, options)


def _raw_variant(truth: str, rng) -> str:
    """How a careless annotator types the right answer; normalises back to ``truth``."""
    if truth.isdigit():
        return _DIGIT_WORDS.get(truth, truth)
    if truth in ("yes", "no"):
        return pick(rng, (truth.capitalize(), truth + "."))
    return pick(rng, (truth.capitalize(), "a " + truth, "the " + truth, truth + "."))


@functools.lru_cache(maxsize=None)
def _normalized(answer: str) -> str:
    """The official normalisation, once per distinct answer (the demo repeats a few dozen)."""
    return normalize_result_answer(answer)


def annotate(truth: str, rng) -> tuple[list[dict], str]:
    """Ten annotator answers with some disagreement, and the multiple-choice answer.

    0-3 annotators (usually none) give a plausible wrong answer, so the truth
    always stays the majority; a few right ones type it sloppily ("Yes", "two").
    """
    n_wrong = int(rng.choice(4, p=(0.55, 0.25, 0.13, 0.07)))
    wrong = set(rng.permutation(10)[:n_wrong].tolist())
    sloppy, conf_u = rng.random(10), rng.random(10)
    answers = []
    for i in range(10):
        if i in wrong:
            text = _wrong_answer(truth, rng)
            conf = "maybe" if conf_u[i] < 0.5 else ("yes" if conf_u[i] < 0.85 else "no")
        else:
            text = _raw_variant(truth, rng) if sloppy[i] < 0.08 else truth
            conf = "yes" if conf_u[i] < 0.9 else ("maybe" if conf_u[i] < 0.98 else "no")
        answers.append({"answer": text, "answer_confidence": conf, "answer_id": i + 1})
    counts = collections.Counter(_normalized(a["answer"]) for a in answers)
    best = max(counts.values())
    mc = truth if counts[truth] == best else min(a for a, c in counts.items() if c == best)
    return answers, mc


# --------------------------------------------------------------------------- files


def _question_file(subtype: str, questions: list[dict]) -> dict:
    return {"info": _INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": _LICENSE,
            "data_subtype": subtype, "questions": questions}


def _annotation_file(subtype: str, annotations: list[dict]) -> dict:
    # Key order and the trailing data_type follow the real v2 annotation files.
    return {"info": _INFO, "license": _LICENSE, "data_subtype": subtype, "annotations": annotations,
            "data_type": "mscoco"}


def feature_path(root: Path, split: str, image_id: int) -> Path:
    """Where the bottom-up features of an image live (real naming scheme)."""
    return Path(root) / "coco_extract" / SUBTYPES[split] / f"{FEATURE_PREFIX[split]}{image_id:012d}.jpg.npz"


def _qa_records(scene_list, rng, sizes, qid_offset: int = 0):
    """Question and annotation records for a list of scenes."""
    questions, annotations = [], []
    for scene in scene_list:
        n = int(rng.integers(sizes["min_questions"], sizes["max_questions"] + 1))
        for k, q in enumerate(generate_questions(scene.objects, rng, n)):
            qid = scene.image_id * 1000 + qid_offset + k
            questions.append({"image_id": scene.image_id, "question": q["question"], "question_id": qid})
            answers, mc = annotate(q["answer"], rng)
            annotations.append({"question_type": q["question_type"], "multiple_choice_answer": mc,
                                "answers": answers, "image_id": scene.image_id,
                                "answer_type": q["answer_type"], "question_id": qid,
                                "_kind": q["meta"]["kind"]})
    return questions, annotations


def _strip_private(annotations: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if not k.startswith("_")} for a in annotations]


def _first_ids(sizes: dict) -> dict[str, int]:
    """First image id of each split; splits start on separate 100k blocks."""
    first, out = 1, {}
    for split in ("train", "val", "test"):
        out[split] = first
        last = first + sizes[split] - 1
        first = (last // 100_000 + 1) * 100_000 + 1
    return out


def _resolve_sizes(sizes: dict | None) -> dict:
    merged = resolve_sizes(DEFAULT_SIZES, sizes)
    if merged["vg"] > merged["train"]:
        raise ValueError("VG questions reuse train images: sizes['vg'] <= sizes['train']")
    return merged


def _stats(scene_sets, records, vg_records) -> dict:
    """Counts, answer-type mix, distinct answers and the majority baseline."""
    annotated = {"train": records["train"][1], "val": records["val"][1], "vg": vg_records[1]}
    all_ann = [a for anns in annotated.values() for a in anns]
    answer, acc = majority_baseline(annotated["train"], annotated["val"])
    spatial = sum(a["_kind"] in SPATIAL_KINDS for a in all_ann)
    return {
        "images": {**{s: len(v) for s, v in scene_sets.items()}, "vg": len({q["image_id"] for q in vg_records[0]})},
        "questions": {**{s: len(records[s][0]) for s in records}, "vg": len(vg_records[0])},
        "answer_types": {s: dict(sorted(collections.Counter(a["answer_type"] for a in anns).items()))
                         for s, anns in annotated.items()},
        "spatial_fraction": round(spatial / max(1, len(all_ann)), 4),
        "num_answers": len({a["multiple_choice_answer"] for a in all_ann}),
        "majority_answer": answer,
        "majority_baseline_acc_val": round(acc, 2),
    }


def build_vqa_demo(root: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the VQA demo under ``root`` (see module doc) and return its stats.

    At once if ``root/vqa/.demo_complete`` records the same version, seed and sizes.
    """
    root, sizes = Path(root), _resolve_sizes(sizes)
    return built_once(root / "vqa" / ".demo_complete", VERSION, seed, sizes,
                      lambda: _write_vqa_demo(root, seed, sizes))


def _write_vqa_demo(root: Path, seed: int, sizes: dict) -> dict:
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    first = _first_ids(sizes)
    scene_sets = {s: sc.make_scenes(sizes[s], streams[0], first[s]) for s in SUBTYPES}
    for split, scene_list in scene_sets.items():
        for scene in scene_list:
            sc.write_feature_file(feature_path(root, split, scene.image_id), scene)

    records = {s: _qa_records(scene_sets[s], streams[1 + i], sizes) for i, s in enumerate(SUBTYPES)}
    vg_pick = np.sort(streams[4].choice(sizes["train"], sizes["vg"], replace=False))
    vg_records = _qa_records([scene_sets["train"][i] for i in vg_pick], streams[4], sizes, VG_QID_OFFSET)

    vqa = root / "vqa"
    for split, subtype in SUBTYPES.items():
        atomic_write_json(vqa / f"v2_OpenEnded_mscoco_{subtype}_questions.json", _question_file(subtype, records[split][0]),
                          compact=True)
        if split != "test":
            atomic_write_json(vqa / f"v2_mscoco_{subtype}_annotations.json",
                        _annotation_file(subtype, _strip_private(records[split][1])), compact=True)
    atomic_write_json(vqa / "VG_questions.json", _question_file("train2014", vg_records[0]), compact=True)
    atomic_write_json(vqa / "VG_annotations.json", _annotation_file("train2014", _strip_private(vg_records[1])),
                      compact=True)

    return _stats(scene_sets, records, vg_records)


def main(argv: list[str] | None = None) -> None:
    cli("Build the synthetic VQA demo dataset.", "vqa", build_vqa_demo, argv)


if __name__ == "__main__":
    main()
