"""RefCOCO / RefCOCO+ / RefCOCOg: the `refer` toolkit's raw files -> our per-split JSON files.

Input is what users download for lichengunc/refer: a folder holding ``refs(unc).p``
(RefCOCO, RefCOCO+) or ``refs(umd).p`` (RefCOCOg, UMD split) and the COCO ``instances.json``.
Output is ``<out>/<split>.json`` per split, one entry per sentence:
``{"tokens", "image_id", "file_name", "split", "bbox", "name", "height", "width"}`` plus
``ref_id``, ``sent_id`` and ``sent`` so predictions can be traced back to the sentence.

Everything is checked while converting, so a wrong folder or a mixed-up refs file fails here,
with the file and the ref named, rather than as a bad box in epoch 3.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from utils.io import atomic_write_json, decode_utf8

SCHEMES = {"refcoco": ("unc", ("train", "val", "testA", "testB")),
           "refcoco+": ("unc", ("train", "val", "testA", "testB")),
           "refcocog": ("umd", ("train", "val", "test"))}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class ReferError(ValueError):
    """Bad raw input; the message names the file and the entry."""


def refs_name(split_by: str) -> str:
    return f"refs({split_by}).p"


def load_refs(refs_path: Path) -> list[dict]:
    """Unpickle a refs file; the public ones were written by Python 2, hence the latin1 retry."""
    refs_path = Path(refs_path)
    if not refs_path.is_file():
        raise ReferError(f"refs file {refs_path} does not exist")
    try:
        refs = _unpickle(refs_path)
    except ReferError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ReferError(f"{refs_path}: not a readable refs pickle ({type(e).__name__}: {e})") \
            from None
    if not isinstance(refs, list):
        raise ReferError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        _check_ref(refs_path, i, ref)
    return refs


class RefsUnpickler(pickle.Unpickler):
    """Reads only plain data: a pickle may name any function, and plain ``pickle.load`` would
    call it (e.g. ``os.system``), so every global outside ``SAFE_GLOBALS`` is refused.

    The refer toolkit's files hold lists, dicts, strings and numbers only, which need no
    global at all; Python 2 wrote sets and the like as ``__builtin__`` globals."""

    SAFE_GLOBALS = {("builtins", n) for n in ("set", "frozenset", "complex")}

    def __init__(self, file, path: Path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module.replace("__builtin__", "builtins"), name) in self.SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ReferError(f"{self.path}: refused to load the global {module}.{name}: a refs "
                         f"file holds plain lists, dicts, strings and numbers, and unpickling "
                         f"a global could run code; is this the refer toolkit's refs file?")


def _unpickle(path: Path):
    with open(path, "rb") as f:
        try:
            return RefsUnpickler(f, path).load()
        except UnicodeDecodeError:
            f.seek(0)
            return RefsUnpickler(f, path, encoding="latin1").load()


def _check_ref(path: Path, i: int, ref) -> None:
    """Each ref needs the keys we read, and sentences with token lists."""
    if not isinstance(ref, dict):
        raise ReferError(f"{path}: ref [{i}] is a {type(ref).__name__}, expected a dict "
                         f"with keys {list(REF_KEYS)}")
    missing = [k for k in REF_KEYS if k not in ref]
    if missing:
        raise ReferError(f"{path}: ref [{i}] (ref_id {ref.get('ref_id')}) lacks {missing}")
    sents = ref["sentences"]
    if not isinstance(sents, list) or not all(
            isinstance(s, dict) and isinstance(s.get("tokens"), list) for s in sents):
        raise ReferError(f"{path}: ref_id {ref['ref_id']}: 'sentences' must be a list of "
                         f"dicts with a 'tokens' list")


def find_refs_file(dataset: str, raw_dir: Path) -> Path:
    """The refs file this dataset's split scheme needs; a wrong one gets a pointed message."""
    if dataset not in SCHEMES:
        raise ReferError(f"unknown dataset {dataset!r}; expected one of {sorted(SCHEMES)}")
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise ReferError(f"raw folder {raw_dir} does not exist")
    split_by = SCHEMES[dataset][0]
    path = raw_dir / refs_name(split_by)
    if path.is_file():
        return path
    found = ", ".join(sorted(p.name for p in raw_dir.glob("refs(*).p"))) or "no refs(*).p file"
    raise ReferError(f"{raw_dir}: {dataset} needs {path.name}, found {found} (refcoco and "
                     f"refcoco+ use refs(unc).p, refcocog uses refs(umd).p)")


def load_instances(raw_dir: Path) -> tuple[dict, dict, dict]:
    """COCO ``instances.json`` as id -> image, id -> annotation, id -> category name."""
    path = Path(raw_dir) / "instances.json"
    if not path.is_file():
        raise ReferError(f"COCO instances file {path} does not exist (it comes with the "
                         f"refer toolkit's download, next to the refs file)")
    try:
        coco = json.loads(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise ReferError(f"{path}: not a valid JSON COCO instances file ({e})") from None
    except ValueError as e:         # not UTF-8: the message names the byte offset
        raise ReferError(str(e)) from None
    if not isinstance(coco, dict) or not all(
            isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
        raise ReferError(f"{path}: expected a COCO instances dict with 'images', "
                         f"'annotations' and 'categories' lists")
    _check_items(path, "images", coco["images"], ("id", "file_name", "height", "width"))
    _check_items(path, "annotations", coco["annotations"], ("id", "image_id", "bbox",
                                                             "category_id"))
    _check_items(path, "categories", coco["categories"], ("id", "name"))
    return ({im["id"]: im for im in coco["images"]},
            {a["id"]: a for a in coco["annotations"]},
            {c["id"]: c["name"] for c in coco["categories"]})


def _check_items(path: Path, key: str, items: list, fields: tuple[str, ...]) -> None:
    """Every COCO item carries the fields we copy, so a lookup never dies on a KeyError."""
    for i, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            raise ReferError(f"{path}: {key}[{i}] lacks {missing}")


def convert(dataset: str, raw_dir: Path) -> dict[str, list[dict]]:
    """Split -> sentence entries, in the refs' order and each ref's sentence order."""
    refs_path = find_refs_file(dataset, raw_dir)
    refs = load_refs(refs_path)
    images, anns, cats = load_instances(raw_dir)
    splits = SCHEMES[dataset][1]
    out: dict[str, list[dict]] = {s: [] for s in splits}
    for ref in refs:
        if ref["split"] not in out:
            raise ReferError(f"{refs_path}: ref_id {ref['ref_id']} has split {ref['split']!r}, "
                             f"not one of {dataset}'s splits {list(splits)} (is this the "
                             f"refs file of another dataset?)")
        out[ref["split"]].extend(_entries(refs_path, Path(raw_dir) / "instances.json",
                                          ref, images, anns, cats))
    _check_no_empty_split(refs_path, dataset, out)
    return out


def _check_no_empty_split(refs_path: Path, dataset: str, splits: dict[str, list]) -> None:
    """Every split of the scheme must have a ref: an empty ``val.json`` would only fail (or
    silently evaluate nothing) when a run reads it."""
    empty = [s for s, entries in splits.items() if not entries]
    if empty:
        counts = ", ".join(f"{s} {len({e['ref_id'] for e in es})}" for s, es in splits.items())
        raise ReferError(f"{refs_path}: no ref in split {', '.join(map(repr, empty))}; expected "
                         f"refs in every split of {dataset} (refs per split: {counts}; a "
                         f"truncated or filtered refs file?)")


def _entries(refs_path: Path, inst_path: Path, ref: dict, images: dict, anns: dict,
             cats: dict) -> list[dict]:
    """One entry per sentence of ``ref``; the image fields come from COCO, not the ref,
    whose own ``file_name`` carries an ``_<ann_id>`` suffix."""
    image, ann = _referred(refs_path, inst_path, ref, images, anns, cats)
    bbox = [float(v) for v in ann["bbox"]]
    _check_bbox(refs_path, ref["ref_id"], bbox, image)
    base = {"image_id": int(ref["image_id"]), "file_name": image["file_name"],
            "split": ref["split"], "bbox": bbox, "name": cats[ann["category_id"]],
            "height": int(image["height"]), "width": int(image["width"]),
            "ref_id": ref["ref_id"]}
    return [{"tokens": list(s["tokens"]), **base, "sent_id": s.get("sent_id"),
             "sent": s.get("sent", " ".join(s["tokens"]))} for s in ref["sentences"]]


def _referred(refs_path: Path, inst_path: Path, ref: dict, images: dict, anns: dict,
              cats: dict) -> tuple[dict, dict]:
    """The ref's COCO image and annotation, checked to exist and to belong together."""
    rid, ann_id = ref["ref_id"], ref["ann_id"]
    if ref["image_id"] not in images:
        raise ReferError(f"{refs_path}: ref_id {rid}: image_id {ref['image_id']} is not in "
                         f"{inst_path}")
    if ann_id not in anns:
        raise ReferError(f"{refs_path}: ref_id {rid}: ann_id {ann_id} is not in {inst_path}")
    ann = anns[ann_id]
    if ann["image_id"] != ref["image_id"]:
        raise ReferError(f"{refs_path}: ref_id {rid}: ann_id {ann_id} belongs to image "
                         f"{ann['image_id']} in {inst_path}, not to the ref's image "
                         f"{ref['image_id']}")
    if ann["category_id"] not in cats:
        raise ReferError(f"{inst_path}: annotation {ann_id} (ref_id {rid}) has category_id "
                         f"{ann['category_id']}, not in its categories")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)):
        raise ReferError(f"{inst_path}: annotation {ann_id} (ref_id {rid}) has bbox "
                         f"{bbox!r}, expected [x, y, w, h] numbers")
    return images[ref["image_id"]], ann


def _check_bbox(refs_path: Path, rid, bbox: list[float], image: dict) -> None:
    """Same rule as the VGD loader (+1 pixel slack, COCO boxes are continuous)."""
    x, y, w, h = bbox
    width, height = image["width"], image["height"]
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:
        raise ReferError(f"{refs_path}: ref_id {rid}: bbox {bbox} [x, y, w, h] does not lie "
                         f"inside its {width}x{height} (width x height) image "
                         f"{image['file_name']}")


def write_splits(splits: dict[str, list[dict]], out_dir: Path) -> dict[str, int]:
    """Write ``<out_dir>/<split>.json`` atomically (a crash never leaves half a split)."""
    out_dir = Path(out_dir)
    for split, entries in splits.items():
        atomic_write_json(out_dir / f"{split}.json", entries)
    return {split: len(entries) for split, entries in splits.items()}


def size_table(splits: dict[str, list[dict]]) -> str:
    """Split, refs and sentences per split, with a total row."""
    rows = [(s, len({e["ref_id"] for e in es}), len(es)) for s, es in splits.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [f"{'split':<8}{'refs':>8}{'sentences':>11}"]
    lines += [f"{s:<8}{r:>8}{n:>11}" for s, r, n in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert the refer toolkit's refs(unc|umd).p + instances.json into "
                    "<out>/<split>.json (one entry per sentence).")
    p.add_argument("--dataset", required=True, choices=sorted(SCHEMES))
    p.add_argument("--raw", required=True, type=Path,
                   help="folder with refs(unc).p (refcoco, refcoco+) or refs(umd).p "
                        "(refcocog) and instances.json")
    p.add_argument("--out", type=Path, help="output folder (default datasets/vgd/<dataset>)")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns 0, or 2 with 'error: ...' on bad input."""
    args = _parser().parse_args(argv)
    out = args.out or Path("datasets") / "vgd" / args.dataset
    try:
        splits = convert(args.dataset, args.raw)
        write_splits(splits, out)
    except (ReferError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(size_table(splits))
    print(f"wrote {', '.join(f'{s}.json' for s in splits)} to {out}")
    return 0
