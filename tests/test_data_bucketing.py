"""Length bucketing (--BUCKET_BATCHES=on): deterministic, every sample once, disjoint across
ranks, less padding, region counts from the packed store."""
import numpy as np
import pytest
from torch.utils.data import Subset

from core.config import resolve
from core.data.bucketing import BucketBatches, padded_slots, region_counts
from core.data.npz import NpzFeatures
from core.data.pack import pack
from core.data.packed import PackedFeatures
from core.loop import RankBatches, loader


def counts_10_to_100(n=1000, seed=0):
    return np.random.default_rng(seed).integers(10, 101, n)


def test_bucketed_order_is_fixed_by_the_seed_and_covers_every_sample_once():
    counts = counts_10_to_100(1000)
    batches = list(BucketBatches(counts, 32, seed=7, rank=0, world=1))
    assert batches == list(BucketBatches(counts, 32, seed=7, rank=0, world=1))
    assert batches != list(BucketBatches(counts, 32, seed=8, rank=0, world=1))
    assert len(batches) == len(BucketBatches(counts, 32, 7, 0, 1)) == 32     # 31 full + 8
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches)[:2] == [8, 32]


def test_ranks_take_disjoint_shares_of_each_global_batch():
    counts = counts_10_to_100(203)
    world = 3
    ranks = [list(BucketBatches(counts, 16, seed=1, rank=r, world=world)) for r in range(world)]
    whole = BucketBatches(counts, 16, seed=1, rank=0, world=1).global_batches()
    assert all(len(r) == len(whole) for r in ranks)
    for step, batch in enumerate(whole):
        shares = [set(r[step]) for r in ranks]
        assert set.union(*shares) == set(batch.tolist())
        assert sum(len(s) for s in shares) == len(batch)                 # disjoint
    assert sorted(i for r in ranks for b in r for i in b) == list(range(203))


def test_bucketing_cuts_the_padding_of_10_to_100_regions():
    counts = counts_10_to_100(4000)
    shuffled = padded_slots(counts, list(RankBatches(4000, 64, True, 0)))
    bucketed = padded_slots(counts, list(BucketBatches(counts, 64, 0, 0, 1)))
    assert shuffled > 40                     # a random batch of 64 is padded to ~99 regions
    assert bucketed < 2 and bucketed < shuffled / 20


class Samples:
    """A task dataset as the loops see it: ``entries`` naming an image, its ``feats``."""

    def __init__(self, ids, feats):
        self.entries, self.feats = [{"image_id": i} for i in ids], feats

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        return i


class Task:
    def __init__(self):
        self.lines = []
        self.log = self.lines.append
        self.collate = list


def test_region_counts_come_from_the_packed_store(tmp_path, npz_writer):
    regions = {3: 12, 5: 40, 8: 7, 13: 25}
    for iid, k in regions.items():
        npz_writer(tmp_path / "train" / f"COCO_train2014_{iid:012d}.jpg.npz", k, seed=iid)
    pack([tmp_path / "train"], tmp_path / "packed", progress=False)
    samples = Samples([8, 3, 13, 3, 5], PackedFeatures(tmp_path / "packed"))
    counts, why = region_counts(samples, max_regions=30)
    assert why == "" and counts.tolist() == [7, 12, 25, 12, 30]          # capped at 30
    view = Subset(Subset(samples, [4, 2, 0]), [0, 2])                    # a search split
    assert region_counts(view, 100)[0].tolist() == [40, 7]
    cfg = resolve("vqa", "train", {"BUCKET_BATCHES": "on", "NUM_WORKERS": 0, "MAX_REGIONS": 30})
    batches = loader(Task(), samples, cfg, 2, True, seed=0).batch_sampler
    assert isinstance(batches, BucketBatches) and batches.counts.tolist() == counts.tolist()
    assert isinstance(loader(Task(), samples, cfg, 2, False).batch_sampler, RankBatches)


def test_npz_features_are_not_bucketed_and_the_log_says_why(tmp_path, npz_writer):
    npz_writer(tmp_path / "COCO_train2014_000000000003.jpg.npz", 12)
    samples = Samples([3, 3], NpzFeatures([tmp_path]))
    cfg = resolve("vqa", "train", {"BUCKET_BATCHES": "on", "NUM_WORKERS": 0})
    task = Task()
    for epoch in range(2):
        batches = loader(task, samples, cfg, 2, True, seed=epoch).batch_sampler
        assert isinstance(batches, RankBatches)
    assert task.lines == ["BUCKET_BATCHES=on: batches not bucketed, its features are .npz "
                          "files, whose region counts are only known by reading every file; "
                          "pack them (pack_features.py) to bucket"]          # once


def test_bucket_batches_key_takes_only_off_or_on():
    from core.config import ConfigError
    assert resolve("vqa", "train", {}).BUCKET_BATCHES == "off"
    with pytest.raises(ConfigError, match="BUCKET_BATCHES"):
        resolve("vqa", "train", {"BUCKET_BATCHES": "yes"})
