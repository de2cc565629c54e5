"""Length bucketing (``--BUCKET_BATCHES=on``): training batches of samples with similar region
counts, so that less of each batch is padding.

Real VQA features have 10-100 regions and a batch is padded to its largest image; drawn at
random, a batch of 64 nearly always holds one image of ~100 regions, and half of every batch
is padding. Bucketed, a batch spans a few regions.

The order is a function of the seed alone: a random permutation is cut into chunks of
``CHUNK_BATCHES`` global batches, each chunk sorted by region count (ties in permutation order)
and cut into batches, and the batches are shuffled. Every torchrun rank builds the same order
and takes every world-th sample of each global batch, as ``core.loop.RankBatches`` does: the
ranks see disjoint samples, every sample once per epoch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Subset

from core.data.packed import PackedFeatures
from utils import dist

CHUNK_BATCHES = 50     # batches sorted together: larger pads less, smaller varies batches more


class BucketBatches:
    """Global batches of similar region counts in a fixed order per seed; this rank takes
    every ``world``-th sample of each (defaults: this process's rank and world size)."""

    def __init__(self, counts: np.ndarray, batch_size: int, seed: int,
                 rank: int | None = None, world: int | None = None):
        self.counts, self.batch_size, self.seed = np.asarray(counts), batch_size, seed
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world() if world is None else world

    def __len__(self):
        return (len(self.counts) + self.batch_size - 1) // self.batch_size

    def global_batches(self) -> list[np.ndarray]:
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.counts), generator=gen).numpy()
        chunk = self.batch_size * CHUNK_BATCHES
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.counts[part], kind="stable")]
            batches += [part[s:s + self.batch_size] for s in range(0, len(part), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in shuffled]

    def __iter__(self):
        for batch in self.global_batches():
            share = batch[self.rank::self.world].tolist()
            if share:
                yield share


def padded_slots(counts: np.ndarray, batches) -> float:
    """Padding rows per sample when each batch is padded to its largest sample."""
    counts = np.asarray(counts)
    total = sum(int(counts[b].max()) * len(b) - int(counts[b].sum()) for b in batches if len(b))
    return total / max(len(counts), 1)


def region_counts(dataset, max_regions: int) -> tuple[np.ndarray | None, str]:
    """(regions of every sample of ``dataset`` capped at ``max_regions``, "") when the
    feature store knows them without reading the features, else (None, why not)."""
    root, positions = dataset, np.arange(len(dataset))
    while isinstance(root, Subset):          # search splits: views of the task dataset
        positions = np.asarray(root.indices, dtype=np.int64)[positions]
        root = root.dataset
    feats, entries = getattr(root, "feats", None), getattr(root, "entries", None)
    if entries is None or not entries or "image_id" not in entries[0]:
        return None, "its samples do not name one image each"
    if not isinstance(feats, PackedFeatures):
        return None, ("its features are .npz files, whose region counts are only known by "
                      "reading every file; pack them (pack_features.py) to bucket")
    ids = np.array([entries[i]["image_id"] for i in positions], dtype=np.int64)
    index = feats.index
    rows = np.searchsorted(index["image_id"], ids)
    return np.minimum(index["count"][rows], max_regions).astype(np.int64), ""


def bucketed_sampler(task, dataset, batch_size: int, seed: int, max_regions: int):
    """A ``BucketBatches`` over ``dataset``, or None (logged once per dataset) when its region
    counts are not known cheaply. The counts are read once and kept on the dataset."""
    cached = getattr(dataset, "_bucket_counts", None)
    if cached is None:
        counts, why = region_counts(dataset, max_regions)
        if counts is None:
            task.log(f"BUCKET_BATCHES=on: batches not bucketed, {why}")
        cached = (counts,)
        dataset._bucket_counts = cached
    return None if cached[0] is None else BucketBatches(cached[0], batch_size, seed)
