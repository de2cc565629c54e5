"""What a run records after every epoch besides its checkpoint and pictures.

``records.jsonl``: one JSON object per line and epoch: loss, learning rate, throughput,
metrics, wall time; for a search also every block's probabilities, how many blocks changed
their arg-max and for how many epochs none has (the stability count). With ``TENSORBOARD``
the same numbers go to TensorBoard events in ``tensorboard/``. A resumed run drops the lines
of the epochs it redoes, as ``pictures/history.json`` does.

``metrics.json`` of a training: every epoch's evaluation and the best epoch, by the first
evaluated split's main metric (higher is better in every task).
"""
from __future__ import annotations

import datetime
import json

from core.config import ConfigError
from utils.io import atomic_write_text

RECORDS = "records.jsonl"
# Fields that differ between two runs of the same seed (a resumed run and an uninterrupted one).
TIMING_FIELDS = ("samples_per_s", "epoch_seconds", "finished_at")


# --- arg-max stability of a search ----------------------------------------------------------
def block_probs(net) -> dict:
    """``{"enc": [{op: softmax weight}, ...], "dec": [...]}`` of a supernet, block by block."""
    return {side: [dict(zip(m.names, m.probs().tolist()))
                   for m in getattr(net.backbone, f"{side}_list")] for side in ("enc", "dec")}


def argmax_of(probs: dict) -> dict:
    """The chosen op of every block: ``{"enc": ["self_att_64", ...], "dec": [...]}``."""
    return {side: [max(block, key=block.get) for block in blocks]
            for side, blocks in probs.items()}


def argmax_step(before: dict, after: dict, stable: int, searched: bool) -> tuple[int, int]:
    """(blocks whose arg-max changed from ``before`` to ``after``, the stability count after
    this epoch). The count is the number of epochs in a row with architecture steps and no
    change; an epoch without architecture steps (before ARCH_START_EPOCH) counts none."""
    changed = sum(a != b for side in after for a, b in zip(before[side], after[side]))
    if not searched:
        return changed, 0
    return changed, 0 if changed else stable + 1


def stability_line(epoch: int, changed: int, stable: int, blocks: int, searched: bool) -> str:
    if not searched:
        return f"epoch {epoch}: no architecture step yet (ARCH_START_EPOCH)"
    if changed:
        return (f"epoch {epoch}: arg-max: {changed} of {blocks} blocks changed since "
                f"{'epoch ' + str(epoch - 1) if epoch > 1 else 'the start'}")
    return (f"epoch {epoch}: arg-max stable: no block changed for {stable} "
            f"epoch{'s' if stable > 1 else ''}")


# --- the best epoch of a training -------------------------------------------------------------
def main_metric(metrics: dict) -> str:
    """The metric a task is ranked by: its first top-level number that is not a count
    (VQA ``overall``, grounding ``acc``, retrieval ``rsum``)."""
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and key != "n" and not key.startswith("n_"):
            return key
    raise ValueError(f"no metric to rank epochs by in {sorted(metrics)}")


def metrics_file(history: list[dict]) -> dict:
    """The content of ``metrics.json``: ``{"best": {...}, "epochs": history}``; the best is
    the earliest epoch with the highest main metric of the first evaluated split."""
    split = next((k for k in history[0] if k != "epoch"), None) if history else None
    try:
        metric = main_metric(history[0][split]) if split else None
    except ValueError:          # a split without labels scores nothing
        metric = None
    if metric is None:
        return {"best": None, "epochs": history}
    best = max(history, key=lambda r: (r[split][metric], -r["epoch"]))
    return {"best": {"epoch": best["epoch"], "split": split, "metric": metric,
                     "value": best[split][metric]}, "epochs": history}


def history_of(content) -> list[dict]:
    """The epochs of a stored ``metrics.json`` (a plain list in runs from before ``best``)."""
    if isinstance(content, dict):
        return list(content.get("epochs", []))
    return list(content or [])


# --- records.jsonl (and TensorBoard) ------------------------------------------------------------
def check_tensorboard() -> None:
    """TENSORBOARD = true needs ``torch.utils.tensorboard``, i.e. the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("TENSORBOARD = true, but the tensorboard package is not installed "
                          "(pip install tensorboard); records.jsonl holds the same numbers")


class Records:
    """``records.jsonl`` of a run (rank 0 writes); ``kept_until``: the epoch a resumed run
    starts after (its later lines are dropped), 0 for a new run."""

    def __init__(self, run, tensorboard: bool, kept_until: int = 0):
        self.run, self.path = run, run.folder / RECORDS
        self.writer = None
        if not run.main:
            return
        records = self.read()
        if any(r["epoch"] > kept_until for r in records):     # epochs the resume redoes
            self._write([r for r in records if r["epoch"] <= kept_until])
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run.folder / "tensorboard"))

    def read(self) -> list[dict]:
        """The records so far; a line that does not parse (written by hand?) is skipped."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                out.append(record)
        return out

    def add(self, record: dict, stats: dict) -> dict:
        """Write ``record`` with the epoch's ``stats`` (loss, lr, throughput, seconds) and the
        time, replacing any line of the same or a later epoch; returns the full line."""
        line = {"epoch": record["epoch"], **stats, **{k: v for k, v in record.items()
                                                      if k != "epoch"},
                "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}
        if not self.run.main:
            return line
        self._write([r for r in self.read() if r["epoch"] < line["epoch"]] + [line])
        if self.writer is not None:
            for tag, value in _scalars(line):
                self.writer.add_scalar(tag, value, line["epoch"])
            self.writer.flush()
        return line

    def _write(self, records: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(record: dict, prefix: str = ""):
    """(tag, number) of every number in a record, nested keys joined with '/'."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, list):
            yield from _scalars({f"{i:02d}": v for i, v in enumerate(value)}, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            yield tag, value
