"""The task seam: everything a task differs in — data, head, loss, metric.

The loops (core/search.py, core/train.py, core/loop.py) ask a task these questions
and nothing else; it knows nothing about questions, boxes or captions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from core.data.layout import data_paths
from core.data.text import vocab_words
from core.loop import loader, to_device
from utils import dist


# task name -> ``build(root) -> stats``: writes the task's embedded synthetic data under
# ``root`` (``--DATASET=demo``). The top-level ``demo`` package registers its builders here
# when imported (the scripts import it), so core never imports the demo.
DEMO_BUILDERS: dict[str, Callable[[Path], dict]] = {}


class Task:
    name = ""
    datasets: tuple[str, ...] = ()   # values of --DATASET; 'demo' is the embedded synthetic one
    # (original prefix, our prefix) pairs applied when loading the original's checkpoints
    original_key_prefixes: tuple[tuple[str, str], ...] = ()
    # (batch key, words) of the list of sample ids every batch carries, for error messages
    batch_ids: tuple[str, str] = ("", "")
    # the one number of ``metric()`` that ranks models (a study's table, its random search)
    headline = ""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.vocab: dict[str, int] = {}
        self.word_vectors = None
        self._data_paths = None

    @property
    def data_paths(self):
        """Where this task's files are (our tree or the original's), decided once and logged."""
        if self._data_paths is None:
            self._data_paths = data_paths(self.name, Path(self.cfg.DATA_ROOT),
                                          self.cfg.DATA_LAYOUT, self.cfg.DATASET)
            self.log(self._data_paths.describe())
        return self._data_paths

    # --- data --------------------------------------------------------------------------
    def prepare(self, word_vectors: bool = True) -> None:
        """Vocabulary, word vectors and label spaces (cached on disk where costly).
        ``word_vectors`` False: no word vectors (``self.word_vectors`` stays None), for a
        network whose embedding comes from a checkpoint."""
        raise NotImplementedError

    def word_vector_source(self, wanted: bool) -> str | None:
        """``WORD_VECTORS``, or None when no word vectors are wanted."""
        return self.cfg.WORD_VECTORS if wanted else None

    def dataset(self, split: str) -> Dataset:
        """The samples of ``split`` (splits may be joined with '+')."""
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def pairs_in(self, batch: dict) -> int:
        """How many samples (text-image pairs) a batch scores, for the loss and speed lines."""
        return len(batch["txt"])

    def describe_batch(self, batch: dict, shown: int = 64) -> str:
        """``the batch of question ids [1, 2, ...] (64 in all)``: which samples to inspect."""
        key, words = self.batch_ids
        ids = list(batch.get(key, [])) if key else []
        if not ids:
            return "a batch"
        more = f", ... ({len(ids)} in all)" if len(ids) > shown else ""
        return f"the batch of {words} [{', '.join(str(i) for i in ids[:shown])}{more}]"

    # --- model -------------------------------------------------------------------------
    def build_head(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, out, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def model_meta(self) -> dict:
        """What a checkpoint records to rebuild the network: vocabulary size and words in
        index order (``check_vocabularies`` compares them when a checkpoint is loaded)."""
        return {"vocab_size": len(self.vocab), "vocab": vocab_words(self.vocab)}

    # --- epochs and evaluation ----------------------------------------------------------
    def start_epoch(self, net: nn.Module, dataset: Dataset, epoch: int, device) -> None:
        """Called before every training (or search) epoch; e.g. hard-negative mining."""

    def evaluate(self, net: nn.Module, dataset: Dataset, device, desc: str):
        """(metrics, predictions): batches through ``net`` (in eval mode, no grad), then
        ``predict`` and ``metric``. Tasks whose scoring is not per sample override it."""
        predictions = []
        # Under torchrun each rank predicts every world-th batch slice; the gathered
        # predictions are put back in dataset order, each sample exactly once.
        for batch in tqdm(loader(self, dataset, self.cfg, self.cfg.eval_batch_size(), False),
                          desc=desc, leave=False, dynamic_ncols=True, disable=not dist.is_main()):
            batch = to_device(batch, device)
            predictions += self.predict(net(batch), batch)
        predictions = in_dataset_order(predictions, len(dataset), self.cfg.eval_batch_size())
        return self.metric(predictions, dataset), predictions

    def predict(self, out, batch: dict) -> list[dict]:
        raise NotImplementedError

    def metric(self, predictions: list[dict], dataset: Dataset) -> dict:
        """Metrics of a split; empty when the split has no labels (e.g. a test split)."""
        raise NotImplementedError

    def write_predictions(self, predictions: list[dict], folder: Path, split: str) -> Path:
        raise NotImplementedError

    def baseline(self, train: Dataset, evaluated: Dataset) -> dict:
        """A trivial baseline on the evaluated split, for the log (e.g. majority answer)."""
        return {}

    def attention_reading(self, output, batch: dict, att: dict) -> tuple[list, dict, np.ndarray]:
        """What an attention map (core/pictures.py) writes beside one sample: (text lines of
        the answer, boxes to outline {label: (xyxy, colour)}, weight of every region)."""
        raise NotImplementedError


def in_dataset_order(local: list, n: int, batch_size: int) -> list:
    """Gather every rank's predictions (see ``core.loop.RankBatches``) in dataset order."""
    if not dist.active():
        return local
    parts = dist.gather_per_rank(local)
    owner = [[] for _ in parts]
    for start in range(0, n, batch_size):
        block = list(range(start, min(start + batch_size, n)))
        for r in range(len(parts)):
            owner[r] += block[r::len(parts)]
    merged = [None] * n
    for r, part in enumerate(parts):
        for idx, pred in zip(owner[r], part):
            merged[idx] = pred
    return merged


def unwrap_subset(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The task dataset under any ``Subset`` views (search splits), and the positions in it
    of the view's samples, in the view's order."""
    if isinstance(dataset, Subset):
        root, inner = unwrap_subset(dataset.dataset)
        return root, inner[np.asarray(dataset.indices, dtype=np.int64)]
    return dataset, np.arange(len(dataset))


def entries_of(dataset: Dataset) -> list:
    """The ``entries`` of a task dataset, through any ``Subset`` views."""
    root, positions = unwrap_subset(dataset)
    return [root.entries[i] for i in positions]
