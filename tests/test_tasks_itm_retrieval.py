"""Retrieval metrics: hand-computed ranks (ties pessimistic), edge matrices, a slow cross-check."""
import time

import numpy as np
import pytest

from core.tasks.itm.retrieval import i2t_ranks, rank_summary, retrieval_metrics, t2i_ranks

# 3 images, captions stored out of order; image 2 has a single caption.
#   image 0 owns captions 1, 3;  image 1 owns 0, 4;  image 2 owns 2.
CAPTION_IMAGE = np.array([1, 0, 2, 0, 1])
SCORES = np.array([
    #  c0   c1   c2   c3   c4
    [0.2, 0.9, 0.1, 0.9, 0.3],   # image 0
    [0.5, 0.6, 0.7, 0.1, 0.6],   # image 1
    [0.3, 0.9, 0.7, 0.2, 0.1],   # image 2
])


def test_i2t_ranks_by_hand():
    # image 0: own c1 = c3 = 0.9 (own ties never count); no wrong caption >= 0.9   -> 1
    # image 1: best own c4 = 0.6; wrong c1 = 0.6 (tie, counts against), c2 = 0.7  -> 3
    # image 2: own c2 = 0.7; wrong c1 = 0.9 above it                                -> 2
    assert i2t_ranks(SCORES, CAPTION_IMAGE).tolist() == [1, 3, 2]


def test_t2i_ranks_by_hand():
    # c0 -> image 1 (0.5): column [.2, .5, .3], nothing else >= .5          -> 1
    # c1 -> image 0 (0.9): column [.9, .6, .9], image 2 ties (counts)        -> 2
    # c2 -> image 2 (0.7): column [.1, .7, .7], image 1 ties (counts)        -> 2
    # c3 -> image 0 (0.9): column [.9, .1, .2]                               -> 1
    # c4 -> image 1 (0.6): column [.3, .6, .1]                               -> 1
    assert t2i_ranks(SCORES, CAPTION_IMAGE).tolist() == [1, 2, 2, 1, 1]


def test_metrics_by_hand():
    m = retrieval_metrics(SCORES, CAPTION_IMAGE)
    # i2t ranks [1, 3, 2]: R@1 = 1/3, R@5 = R@10 = all; median 2, mean 2
    assert m["i2t"] == pytest.approx({"r1": 100 / 3, "r5": 100.0, "r10": 100.0,
                                      "medr": 2.0, "meanr": 2.0})
    # t2i ranks [1, 2, 2, 1, 1]: R@1 = 3/5; median 1, mean 7/5
    assert m["t2i"] == pytest.approx({"r1": 60.0, "r5": 100.0, "r10": 100.0,
                                      "medr": 1.0, "meanr": 1.4})
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 60 + 100 + 100)
    assert all(type(v) is float for d in (m["i2t"], m["t2i"]) for v in d.values())


def test_rank_summary_floors_the_median_and_counts_boundaries():
    # ranks [1, 2, 5, 10, 11, 40]: <=1: 1, <=5: 3, <=10: 4 of 6; median (5+10)/2 = 7.5 -> 7
    s = rank_summary(np.array([1, 2, 5, 10, 11, 40]))
    assert s == pytest.approx({"r1": 100 / 6, "r5": 50.0, "r10": 400 / 6,
                               "medr": 7.0, "meanr": 69 / 6})


def test_constant_matrix_is_worst_case_not_perfect():
    # 4 images x 2 captions, every score equal: every tie counts against.
    # i2t: 1 + 6 wrong captions = 7; t2i: all 4 images tie -> 4.
    ci = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    scores = np.ones((4, 8))
    assert i2t_ranks(scores, ci).tolist() == [7] * 4
    assert t2i_ranks(scores, ci).tolist() == [4] * 8
    m = retrieval_metrics(scores, ci)
    assert (m["i2t"]["r1"], m["i2t"]["r5"], m["i2t"]["r10"], m["i2t"]["medr"]) == (0, 0, 100, 7)
    assert (m["t2i"]["r1"], m["t2i"]["r5"], m["t2i"]["medr"]) == (0, 100, 4)


def _shuffled_captions(counts, seed):
    rng = np.random.default_rng(seed)
    ci = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(ci)
    return ci


def test_perfect_matrix():
    ci = _shuffled_captions([3, 1, 2, 3], seed=1)
    scores = (ci[None, :] == np.arange(4)[:, None]).astype(np.float32)
    m = retrieval_metrics(scores, ci)
    assert i2t_ranks(scores, ci).tolist() == [1] * 4
    assert t2i_ranks(scores, ci).tolist() == [1] * 9
    for d in (m["i2t"], m["t2i"]):
        assert d == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert m["rsum"] == 600.0


def test_reversed_matrix():
    # own pairs score lowest: image i ranks its caption after all 9 - c_i wrong ones,
    # every caption finds its image last of 4.
    counts = [3, 1, 2, 3]
    ci = _shuffled_captions(counts, seed=2)
    scores = -(ci[None, :] == np.arange(4)[:, None]).astype(np.float64)
    assert i2t_ranks(scores, ci).tolist() == [1 + 9 - c for c in counts]   # [7, 9, 8, 7]
    assert t2i_ranks(scores, ci).tolist() == [4] * 9
    m = retrieval_metrics(scores, ci)
    assert m["i2t"]["r1"] == 0 and m["i2t"]["r5"] == 0 and m["i2t"]["r10"] == 100
    assert m["i2t"]["medr"] == 7.0 and m["i2t"]["meanr"] == 7.75
    assert m["t2i"] == {"r1": 0.0, "r5": 100.0, "r10": 100.0, "medr": 4.0, "meanr": 4.0}
    assert m["rsum"] == 300.0


def _slow_first_hit(scores_row, is_right):
    """Sort candidates best first, wrong ones ahead of right ones on ties; 1-based first hit."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], bool(is_right[j])))
    return 1 + next(pos for pos, j in enumerate(order) if is_right[j])


def test_matches_slow_double_loop_on_random_ties():
    rng = np.random.default_rng(0)
    n_img, n_cap = 20, 60
    ci = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_cap - n_img)])
    rng.shuffle(ci)
    scores = np.round(rng.random((n_img, n_cap)), 1)          # 11 values: many ties
    slow_i2t = [_slow_first_hit(scores[i], [ci[j] == i for j in range(n_cap)])
                for i in range(n_img)]
    slow_t2i = [_slow_first_hit(scores[:, j], [i == ci[j] for i in range(n_img)])
                for j in range(n_cap)]
    assert i2t_ranks(scores, ci).tolist() == slow_i2t
    assert t2i_ranks(scores, ci).tolist() == slow_t2i


def test_independent_of_storage_order():
    rng = np.random.default_rng(3)
    ci = _shuffled_captions([2, 3, 1, 4, 2], seed=3)
    scores = np.round(rng.random((5, 12)), 1)
    perm = rng.permutation(12)
    assert retrieval_metrics(scores[:, perm], ci[perm]) == retrieval_metrics(scores, ci)


def test_accepts_lists_and_integer_scores():
    m = retrieval_metrics([[2, 0], [1, 3]], [0, 1])
    assert m["rsum"] == 600.0


def test_fast_on_flickr_test_size():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((1000, 5000)).astype(np.float32)
    ci = _shuffled_captions([5] * 1000, seed=0)
    start = time.perf_counter()
    retrieval_metrics(scores, ci)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("scores, ci, message", [
    (np.zeros((3, 5)), np.array([0, 1, 2, 0]), r"caption_image has shape \[4\], expected \[5\]"),
    (np.zeros((3, 4)), np.array([0, 1, 1, 0]), "image 2 has no caption"),
    (np.zeros((3, 4)), np.array([0, 1, 2, 3]), r"caption_image\[3\] = 3 is not an image index"),
    (np.zeros((3, 3)), np.array([0.0, 1.0, 2.0]), "expected integer image indices"),
    (np.zeros(5), np.array([0, 0, 0, 0, 0]), r"scores has shape \[5\]"),
    (np.zeros((0, 3)), np.array([0, 0, 0]), r"scores has shape \[0, 3\]"),
    (np.array([[1.0, np.nan]]), np.array([0, 0]), "NaN"),
])
def test_invalid_inputs(scores, ci, message):
    for fn in (i2t_ranks, t2i_ranks, retrieval_metrics):
        with pytest.raises(ValueError, match=message):
            fn(scores, ci)
