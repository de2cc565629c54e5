"""Image–text matching: fast pair scoring, hard-negative mining, the loss."""
import numpy as np
import pytest
import torch

from core.arch import Arch
from core.data.npz import NpzFeatures
from core.tasks.itm import ITMDataset, ITMHead, ITMTask, mine_negatives, score_pairs
from core.tasks.itm.retrieval import chance_r1
from netkit import VOCAB, fixed_net, small_cfg

N_IMG, PER_IMG, REGIONS = 5, 3, 4


@pytest.fixture
def dataset(tmp_path):
    """5 images (4 regions of 24-d features each), 3 captions per image, unordered."""
    cfg = small_cfg(DATASET="demo", MAX_REGIONS=REGIONS, SEED=0)
    g = np.random.default_rng(0)
    keys = [1000 + i for i in range(N_IMG)]
    for k in keys:
        xy = g.uniform(0, 100, (REGIONS, 2))
        np.savez(tmp_path / f"{k}.jpg.npz", x=np.abs(g.standard_normal((24, REGIONS))).astype(np.float32),
                 bbox=np.concatenate([xy, xy + 30], 1).astype(np.float32), image_h=200, image_w=200,
                 num_bbox=REGIONS)
    caption_image = g.permutation(np.repeat(np.arange(N_IMG), PER_IMG))
    tokens = g.integers(3, VOCAB, (len(caption_image), 6))
    tokens[::2, -2:] = 0
    return cfg, ITMDataset(tokens, caption_image, keys, NpzFeatures([tmp_path], 24), cfg)


def _net(cfg, enc_ops=("self_att_16", "feed_forward")):
    net = fixed_net(cfg, Arch(enc_ops, ("rel_self_att_16", "guided_att_16", "feed_forward",
                                        "guided_att_16")))
    net.head = ITMHead(cfg)
    return net.eval()


def _naive(net, ds, pairs):
    """Every pair through the whole network from raw inputs, one at a time."""
    out = []
    for i, j in pairs:
        img, boxes = ds.image(i)
        batch = {"txt": torch.from_numpy(ds.tokens[j:j + 1]), "img": torch.from_numpy(img[None]),
                 "boxes": torch.from_numpy(boxes[None])}
        with torch.no_grad():
            out.append(float(torch.sigmoid(net(batch))))
    return np.array(out)


@pytest.mark.parametrize("enc_ops,cache", [
    (("self_att_16", "feed_forward"), True),      # captions encoded once for the whole pass
    (("self_att_16", "feed_forward"), False),     # ... once per batch of pairs
    (("guided_att_16", "feed_forward"), True)])   # the encoder reads the image: per pair
def test_fast_scoring_equals_naive_pairwise(dataset, enc_ops, cache, monkeypatch):
    cfg, ds = dataset
    if not cache:
        monkeypatch.setattr("core.tasks.itm.TEXT_CACHE_BYTES", 0)
    net = _net(cfg, enc_ops)
    assert net.backbone.encoder_reads_image == (enc_ops[0] == "guided_att_16")
    img = np.repeat(np.arange(N_IMG), len(ds))
    cap = np.tile(np.arange(len(ds)), N_IMG)
    fast = score_pairs(net, ds, img, cap, torch.device("cpu"), batch=7)
    naive = _naive(net, ds, list(zip(img, cap)))
    assert np.allclose(fast, naive, atol=1e-5)
    # arbitrary order, repeated pairs
    pick = np.random.default_rng(1).integers(0, len(img), 20)
    assert np.allclose(score_pairs(net, ds, img[pick], cap[pick], torch.device("cpu"), 4),
                       naive[pick], atol=1e-5)


def test_miner_returns_the_hardest_candidates():
    caption_image = np.repeat(np.arange(4), 5)                 # 4 images x 5 captions
    table = np.random.default_rng(3).permutation(4 * 20).reshape(4, 20).astype(float)
    calls = []

    def score(pair_img, pair_cap):
        calls.append(len(pair_img))
        return table[pair_img, pair_cap]

    neg_caps, neg_imgs = mine_negatives(score, caption_image, 4, candidates=8, top_k=3, seed=0)
    assert calls == [4 * 8 + 20 * 8]                           # one scoring call, both ways
    assert neg_caps.shape == (4, 3) and neg_imgs.shape == (20, 3)
    for i in range(4):
        assert (caption_image[neg_caps[i]] != i).all()         # never its own captions
        s = table[i, neg_caps[i]]
        assert (np.diff(s) <= 0).all()                         # hardest first
    for j in range(20):
        assert (neg_imgs[j] != caption_image[j]).all()
    # the top 3 are the best of the 8 drawn: redraw the same candidates and compare
    from core.tasks.itm import _draw_excluding
    drawn = _draw_excluding(np.random.default_rng(0), 4, 20, 8,
                            lambda r, d: caption_image[d] == r[:, None])
    for i in range(4):
        assert set(neg_caps[i]) == set(sorted(drawn[i], key=lambda c: -table[i, c])[:3])


def test_negatives_are_random_before_the_hard_negative_epoch(dataset):
    """Before ITM_HARD_NEG_EPOCH nothing is scored: top_k random non-matching negatives."""
    cfg, ds = dataset
    task = ITMTask(small_cfg(DATASET="demo", SEED=0, ITM_HARD_NEG_EPOCH=2,
                                     ITM_NEG_TOPK=2), print)

    class Unusable:                                 # any use of the network fails loudly
        def __getattr__(self, name):
            raise AssertionError(f"network used before the hard-negative epoch ({name})")

    task.start_epoch(Unusable(), ds, epoch=1, device=torch.device("cpu"))
    assert ds.neg_captions.shape == (N_IMG, 2) and ds.neg_images.shape == (len(ds), 2)
    for i in range(N_IMG):
        assert (ds.caption_image[ds.neg_captions[i]] != i).all()
    assert (ds.neg_images != ds.caption_image[:, None]).all()
    task.start_epoch(_net(cfg), ds, epoch=2, device=torch.device("cpu"))   # now mined
    assert ds.epoch == 2 and ds.neg_captions.shape == (N_IMG, 2)


def test_loss_counts_the_positive_twice_by_default():
    out = torch.tensor([0.5, -1.0, 2.0])
    batch = {"target": torch.tensor([1.0, 0.0, 0.0]), "weight": torch.tensor([2.0, 1.0, 1.0])}
    sig = torch.sigmoid(out)
    expected = -2 * torch.log(sig[0]) - torch.log(1 - sig[1]) - torch.log(1 - sig[2])
    task = ITMTask(small_cfg(DATASET="demo"), print)
    assert float(task.loss(out, batch)) == pytest.approx(float(expected), rel=1e-5)


def test_margin_loss_is_the_original_hinge_on_matching_probabilities():
    # pairs: 2 positives, their 2 negative captions, their 2 negative images (collate order)
    probs = torch.tensor([0.7, 0.9, 0.6, 0.1, 0.2, 0.95])
    out = torch.logit(probs)
    task = ITMTask(small_cfg(DATASET="demo", ITM_LOSS="margin"), print)
    # caption costs: 0.2+0.6-0.7 = 0.1, 0.2+0.1-0.9 < 0; image costs: 0.2+0.2-0.7 < 0,
    # 0.2+0.95-0.9 = 0.25
    assert float(task.loss(out, {})) == pytest.approx(0.1 + 0.25, abs=1e-5)


def test_training_batch_carries_each_caption_and_image_once(dataset):
    cfg, ds = dataset
    task = ITMTask(small_cfg(DATASET="demo", MAX_REGIONS=REGIONS, IMG_FEAT_SIZE=24,
                             ITM_POS_TWICE=False), print)
    ds.set_negatives(np.zeros((N_IMG, 2), int) + 1, np.zeros((len(ds), 2), int) + 2, epoch=1)
    batch = task.collate([ds[0], ds[1]])
    assert batch["target"].tolist() == [1, 1, 0, 0, 0, 0] and task.pairs_in(batch) == 6
    assert batch["weight"].tolist() == [1.0] * 6
    # two captions + two negative captions, two images + two negative images
    assert batch["txt"].shape[0] == 4 and batch["img"].shape[0] == 4
    assert batch["txt_rows"].tolist() == [0, 1, 2, 3, 0, 1]      # pair 4: same caption,
    assert batch["img_rows"].tolist() == [0, 1, 0, 1, 2, 3]      # other image
    img2, _ = ds.image(2)
    assert torch.equal(batch["img"][2], torch.from_numpy(img2))   # the negative image
    assert torch.equal(batch["txt"][2], torch.from_numpy(ds.tokens[ds.neg_captions[
        ds.caption_image[0], 0]]))                                # the negative caption
    # the same sample draws the same negatives every time (no global RNG)
    assert torch.equal(task.collate([ds[0]])["txt"], task.collate([ds[0]])["txt"])


def _shared_and_separate(task, ds):
    """A training batch of six samples, and the same pairs each with its own caption and image."""
    ds.set_negatives(np.stack([(np.arange(N_IMG) + 1) % N_IMG] * 2, 1),
                     np.stack([(ds.caption_image + 2) % N_IMG] * 2, 1), epoch=1)
    shared = task.collate([ds[j] for j in range(6)])
    separate = dict(shared, txt=shared["txt"][shared["txt_rows"]],
                    img=shared["img"][shared["img_rows"]],
                    boxes=shared["boxes"][shared["img_rows"]])
    del separate["txt_rows"], separate["img_rows"]
    return shared, separate


def _loss_and_grads(net, task, batch):
    net.zero_grad()
    torch.manual_seed(3)
    loss = task.loss(net(batch), batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()
                           if p.grad is not None}


def test_shared_sides_give_the_loss_and_gradients_of_three_separate_pairs(dataset):
    """Each caption's side (embedding, LSTM, encoder) and image's side computed once and
    indexed into its pairs trains exactly as the three pairs through the whole network."""
    cfg, ds = dataset
    cfg = small_cfg(DATASET="demo", MAX_REGIONS=REGIONS, DROPOUT_R=0.0)
    task = ITMTask(cfg, print)
    shared, separate = _shared_and_separate(task, ds)
    net = _net(cfg).train()
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(net, task, b)
                                            for b in (shared, separate))
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and "lstm.weight_hh_l0" in grads_a
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("enc_ops, encoded_rows", [(("self_att_16", "feed_forward"), 12),
                                                   (("guided_att_16", "feed_forward"), 18)])
def test_the_encoder_runs_once_per_caption_unless_it_reads_the_image(dataset, enc_ops,
                                                                     encoded_rows):
    """6 samples = 12 distinct captions in 18 pairs: a text-only encoder sees 12 rows; one
    that reads the image (guided attention) must encode every pair, and with dropout on,
    its masks then match the separate pairs' exactly."""
    cfg, ds = dataset
    cfg = small_cfg(DATASET="demo", MAX_REGIONS=REGIONS, DROPOUT_R=0.1)
    task = ITMTask(cfg, print)
    shared, separate = _shared_and_separate(task, ds)
    net = _net(cfg, enc_ops).train()
    seen = []
    net.backbone.enc_list[0].register_forward_hook(lambda m, args, out: seen.append(len(out)))
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(net, task, b)
                                            for b in (shared, separate))
    assert seen == [encoded_rows, 18]
    if encoded_rows == 18:
        assert torch.allclose(loss_a, loss_b, rtol=1e-6)
        for k in grads_a:
            assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7), k


def test_evaluation_of_a_caption_subset_scores_only_its_images(dataset):
    """A search's architecture split is a set of captions: rank them against their images."""
    from torch.utils.data import Subset
    cfg, ds = dataset
    net = _net(cfg)
    task = ITMTask(small_cfg(DATASET="demo", EVAL_BATCH_SIZE=8), print)
    part = Subset(ds, [0, 1, 2, 3])
    metrics, scores = task.evaluate(net, part, torch.device("cpu"), "arch split")
    images = np.unique(ds.caption_image[:4])
    assert scores.shape == (len(images), 4)
    full = score_pairs(net, ds, np.repeat(images, 4), np.tile(np.arange(4), len(images)),
                       torch.device("cpu"), 8).reshape(len(images), 4)
    assert np.allclose(scores, full)
    assert task.metric(scores, part) == metrics
    # a search's capped architecture evaluation (ARCH_EVAL_SAMPLES): a view of the view
    from core.search import arch_eval_set
    head = arch_eval_set(part, 2)
    _, head_scores = task.evaluate(net, head, torch.device("cpu"), "capped")
    head_images = np.unique(ds.caption_image[:2])
    assert head_scores.shape == (len(head_images), 2)
    assert np.allclose(head_scores, scores[np.searchsorted(images, head_images)][:, :2])
    assert arch_eval_set(part, 0) is part and arch_eval_set(part, 10) is part


def test_attention_reading_is_the_matching_score_over_the_image_attention():
    task = ITMTask(small_cfg(DATASET="demo"), print)
    att = {"img": torch.tensor([[0.25, 0.75]])}
    lines, marked, regions = task.attention_reading(torch.tensor([[0.0]]), {}, att)
    assert lines == ["matching score 0.500", "(sigmoid of the logit)"] and marked == {}
    assert regions.tolist() == [0.25, 0.75]


def test_chance_r1_of_uneven_caption_counts():
    # i2t: a random caption is one of image i's own with probability own_i / all captions
    assert chance_r1([5, 5, 5, 5]) == {"chance_r1_i2t": 25.0, "chance_r1_t2i": 25.0}
    assert chance_r1([1, 3]) == {"chance_r1_i2t": pytest.approx(100 * 2 / 4),
                                 "chance_r1_t2i": 50.0}
    assert chance_r1([]) == {"chance_r1_i2t": 0.0, "chance_r1_t2i": 0.0}
