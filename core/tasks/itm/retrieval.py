"""Image-text retrieval metrics (R@1/5/10, median/mean rank, rsum) from a score matrix.

The original evaluation (inherited from SCAN/VSE++) assumed exactly five captions per image,
stored in image order, and found ranks with ``argsort``, so ties were broken by the sort order
(i.e. by luck). Here the caption->image assignment is explicit (``caption_image``), any number
of captions per image is allowed in any order, and ties are resolved pessimistically: a wrong
candidate that scores *the same* as the right one counts as ranked above it. A constant score
matrix therefore gets the worst rank, not a perfect one, and the result never depends on
the order in which images or captions are stored.
"""
from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)


def _check(scores, caption_image) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scores, caption_image)`` as arrays, or raise ValueError saying what is wrong."""
    scores = np.asarray(scores)
    caption_image = np.asarray(caption_image)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores has shape {list(scores.shape)}, expected a non-empty "
                         f"[n_images, n_captions] matrix")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores has dtype {scores.dtype}, expected real numbers")
    if np.isnan(scores).any():
        first = np.argwhere(np.isnan(scores))[0].tolist()
        raise ValueError(f"scores contains NaN (first at [image, caption] = {first}); "
                         f"a NaN cannot be ranked")
    n_images, n_captions = scores.shape
    if caption_image.ndim != 1 or len(caption_image) != n_captions:
        raise ValueError(f"caption_image has shape {list(caption_image.shape)}, expected "
                         f"[{n_captions}] (one image index per column of scores "
                         f"{list(scores.shape)})")
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image has dtype {caption_image.dtype}, expected integer "
                         f"image indices")
    bad = np.flatnonzero((caption_image < 0) | (caption_image >= n_images))
    if len(bad):
        raise ValueError(f"caption_image[{bad[0]}] = {caption_image[bad[0]]} is not an image "
                         f"index in [0, {n_images}) (scores has {n_images} rows)")
    counts = np.bincount(caption_image, minlength=n_images)
    lonely = np.flatnonzero(counts == 0)
    if len(lonely):
        raise ValueError(f"image {lonely[0]} has no caption in caption_image ({len(lonely)} of "
                         f"{n_images} images have none); every image needs at least one, "
                         f"else its image->text rank is undefined")
    return scores, caption_image


def _own_mask(caption_image: np.ndarray, n_images: int) -> np.ndarray:
    """Boolean [n_images, n_captions]: True where the caption describes that image."""
    return caption_image[None, :] == np.arange(n_images)[:, None]


def i2t_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """1-based rank of each image's best-ranked own caption among all captions.

    rank = 1 + number of *other* images' captions scoring >= the image's best own caption.
    Own captions never count against each other (retrieving any of them is a hit), and a
    tie with a wrong caption counts against (pessimistic, independent of storage order).
    """
    scores, caption_image = _check(scores, caption_image)
    own = _own_mask(caption_image, scores.shape[0])
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    beaten_by = (scores >= best_own[:, None]) & ~own
    return 1 + beaten_by.sum(axis=1)


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """1-based rank of each caption's image among all images (its column, sorted descending).

    rank = number of images scoring >= the right image (the right image counts itself once),
    so a tie with a wrong image counts against.
    """
    scores, caption_image = _check(scores, caption_image)
    right = scores[caption_image, np.arange(scores.shape[1])]
    return (scores >= right[None, :]).sum(axis=0)


def rank_summary(ranks: np.ndarray) -> dict:
    """R@1/5/10 in percent of queries, median rank (floored, as SCAN reports it), mean rank."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    out["medr"] = float(np.floor(np.median(ranks)))
    out["meanr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray) -> dict:
    """``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum"}``; rsum = sum of 6 recalls."""
    scores, caption_image = _check(scores, caption_image)
    i2t = rank_summary(i2t_ranks(scores, caption_image))
    t2i = rank_summary(t2i_ranks(scores, caption_image))
    rsum = sum(d[f"r{k}"] for d in (i2t, t2i) for k in RECALL_AT)
    return {"i2t": i2t, "t2i": t2i, "rsum": float(rsum)}


def chance_r1(captions_per_image) -> dict:
    """Expected R@1 (percent) of ranking at random, given each image's number of captions:
    image->text hits one of the image's own captions, text->image the one right image."""
    own = np.asarray(captions_per_image, dtype=np.float64)
    if own.size == 0:
        return {"chance_r1_i2t": 0.0, "chance_r1_t2i": 0.0}
    return {"chance_r1_i2t": 100.0 * float(own.mean()) / float(own.sum()),
            "chance_r1_t2i": 100.0 / own.size}
