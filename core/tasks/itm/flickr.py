"""Flickr30K retrieval splits in SCAN's ``f30k_precomp`` layout, and the imgid -> file mapping.

``<split>_caps.txt`` holds five consecutive caption lines per image, images in order.
``<split>_ids.txt`` holds Karpathy imgids in one of two layouts found in the real files:
one id per caption line (each repeated five times: dev/test) or one per image (train).
Captions are tied to images explicitly (``caption_image``) so the retrieval metrics never
have to assume "five in a row" again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data.npz import image_id_of
from utils.io import decode_utf8, expect_fields, read_json

SPLITS = ("train", "dev", "test")
CAPTIONS_PER_IMAGE = 5


@dataclass
class CaptionSplit:
    """Captions of one split; ``caption_image[j]`` indexes ``image_ids`` (Karpathy imgids)."""
    captions: list[str]
    caption_image: np.ndarray
    image_ids: list[int]
    ids_file: Path | None = None      # where image_ids came from, for error messages


def read_lines(path: Path, what: str) -> list[str]:
    """Lines without ``\\n``/``\\r\\n``; empty lines at the very end (editor leftovers) dropped.

    Bytes are decoded by hand rather than with universal newlines, so a stray ``\\r`` inside
    a caption cannot split it and shift every later caption onto the wrong image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = decode_utf8(path, path.read_bytes())
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_captions(path: Path) -> list[str]:
    """Caption lines; a blank one in the middle would misalign all later images, so it fails."""
    lines = read_lines(path, "captions")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path} line {n:,} is blank; expected a caption "
                             f"({CAPTIONS_PER_IMAGE} consecutive lines per image)")
    return lines


def _parse_ids(path: Path) -> list[int]:
    lines = read_lines(path, "image ids")
    if not lines:
        raise ValueError(f"{path} is empty; expected Karpathy imgids, one per line")
    ids = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not (s.isascii() and s.isdigit()):
            raise ValueError(f"{path} line {n:,}: {line!r} is not an image id (expected a "
                             f"non-negative integer Karpathy imgid)")
        ids.append(int(s))
    return ids


def _is_per_caption(ids: list[int], n_captions: int | None) -> bool:
    """Which layout: the line count decides when the caption count is known and fits one.

    Otherwise (train has no captions here, or a broken file fits neither) repeats decide:
    the per-image layout lists every image once.
    """
    if n_captions is not None:
        if len(ids) == n_captions:
            return True
        if CAPTIONS_PER_IMAGE * len(ids) == n_captions:
            return False
    return len(set(ids)) < len(ids)


def _collapse(path: Path, ids: list[int]) -> list[int]:
    """Per-caption ids -> one per image, checking that each run of five carries one id."""
    k = CAPTIONS_PER_IMAGE
    if len(ids) % k:
        raise ValueError(f"{path} has {len(ids):,} lines, one id per caption line, which is "
                         f"not a multiple of {k} ({k} captions per image)")
    for start in range(0, len(ids), k):
        for off in range(1, k):
            if ids[start + off] != ids[start]:
                raise ValueError(
                    f"{path} line {start + off + 1:,}: id {ids[start + off]}, but line "
                    f"{start + 1:,} has {ids[start]}; lines {start + 1:,}-{start + k:,} are "
                    f"the {k} captions of image {start // k:,} and must carry the same id")
    return ids[::k]


def _check_unique(path: Path, ids: list[int], lines_per_image: int) -> None:
    """An image listed twice would get split captions and count as its own wrong answer."""
    first: dict[int, int] = {}
    for n, iid in enumerate(ids):
        if iid in first:
            raise ValueError(f"{path} line {n * lines_per_image + 1:,}: imgid {iid} is listed "
                             f"again (first on line {first[iid] * lines_per_image + 1:,}); "
                             f"each image must appear once")
        first[iid] = n


def read_ids(path: Path, n_captions: int | None = None) -> list[int]:
    """One Karpathy imgid per image, from either layout of ``<split>_ids.txt``.

    ``n_captions``: line count of the matching captions file, used to tell the layouts apart.
    """
    path = Path(path)
    ids = _parse_ids(path)
    if _is_per_caption(ids, n_captions):
        ids = _collapse(path, ids)
        _check_unique(path, ids, CAPTIONS_PER_IMAGE)
    else:
        _check_unique(path, ids, 1)
    return ids


def read_split(precomp_dir: Path, split: str) -> CaptionSplit:
    """``<split>_caps.txt`` + ``<split>_ids.txt`` of SCAN's ``f30k_precomp`` folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown Flickr30K split {split!r}; expected one of {', '.join(SPLITS)}")
    caps_path = Path(precomp_dir) / f"{split}_caps.txt"
    ids_path = Path(precomp_dir) / f"{split}_ids.txt"
    captions = read_captions(caps_path)
    image_ids = read_ids(ids_path, n_captions=len(captions))
    k, n = CAPTIONS_PER_IMAGE, len(image_ids)
    if len(captions) != k * n:
        raise ValueError(f"{caps_path} has {len(captions):,} lines; expected {k} × {n:,} = "
                         f"{k * n:,} (five captions per image, "
                         f"{ids_path.name} lists {n:,} images)")
    caption_image = np.repeat(np.arange(n, dtype=np.int64), k)
    return CaptionSplit(captions, caption_image, image_ids, ids_file=ids_path)


def _plain_mapping(path: Path, data: dict) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, name in data.items():
        if not (key.isascii() and key.isdigit()) or int(key) in out:
            raise ValueError(f"{path}: key {key!r} is not a (unique) integer imgid")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: imgid {key} maps to {name!r}, expected an image file name")
        out[int(key)] = name
    return out


def _karpathy_mapping(path: Path, images) -> dict[int, str]:
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' is {type(images).__name__}, expected a list")
    out: dict[int, str] = {}
    for n, entry in enumerate(images):
        expect_fields(path, f"images[{n}]", entry, {"imgid": int, "filename": str})
        if entry["imgid"] in out:
            raise ValueError(f"{path}: images[{n}].imgid {entry['imgid']} is a duplicate")
        out[entry["imgid"]] = entry["filename"]
    return out


def read_id_mapping(path: Path) -> dict[int, str]:
    """imgid -> image file name, from ``id_mapping.json`` ({"0": "1000092795.jpg", ...}) or
    Karpathy's ``dataset_flickr30k.json`` ({"images": [{"imgid", "filename", ...}, ...]})."""
    data = read_json(path, "Flickr30K id mapping")
    if isinstance(data, dict) and "images" in data:
        return _karpathy_mapping(Path(path), data["images"])
    if isinstance(data, dict):
        return _plain_mapping(Path(path), data)
    raise ValueError(f"{path}: a JSON {type(data).__name__}, expected an object "
                     f'{{"imgid": "file name"}} or Karpathy\'s {{"images": [...]}}')


def file_names(split: CaptionSplit, mapping: dict[int, str],
               mapping_name: str = "the id mapping") -> list[str]:
    """Image file name of each image of ``split``; an unmapped imgid names file and id."""
    missing = [iid for iid in split.image_ids if iid not in mapping]
    if missing:
        where = split.ids_file if split.ids_file is not None else "the split"
        raise ValueError(
            f"{where}: image {split.image_ids.index(missing[0]):,} has imgid {missing[0]}, "
            f"which {mapping_name} ({len(mapping):,} entries) does not list; "
            f"{len(missing):,} of {len(split.image_ids):,} imgids are missing")
    return [mapping[iid] for iid in split.image_ids]


def feature_key(file_name: str) -> int:
    """``"1000092795.jpg"`` -> 1000092795: the number ``NpzFeatures`` finds the features by.

    Delegates to ``image_id_of`` (on ``<name>.npz``) so the two can never disagree. Keys go
    up to 8,251,604,257 in Flickr30K: keep them as Python ints or int64, never int32.
    """
    key = image_id_of(file_name if file_name.endswith(".npz") else f"{file_name}.npz")
    if key is None:
        raise ValueError(f"image file name {file_name!r} has no number to find its features "
                         f"by (expected like '1000092795.jpg')")
    return key
