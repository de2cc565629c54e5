"""The bench's new rows on a CPU at toy sizes: bucketed batches pad less, a step row counts
its FLOPs and the fraction of the given peak (bench/gpu.sh runs these rows on a GPU)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_steps  # noqa: E402

TINY = {"HSIZE": 64, "FLAT_MLP_SIZE": 64, "REL_SIZE": 16}


def test_bucketed_vqa_batches_pad_less_than_shuffled_ones():
    from core.config import resolve
    from core.tasks.vqa import VQATask
    task = VQATask(resolve("vqa", "train", {}), print)
    task.ans_to_ix = {f"a{i}": i for i in range(3129)}
    padding = {}
    for bucket in ("off", "on"):
        batches, padding[bucket] = bench_steps.make_batches(task, "vqa", 4, bucket,
                                                            np.random.default_rng(0))
        assert len(batches) == 4 and batches[0]["img"].shape[0] == 4
    assert padding["on"] < padding["off"] / 3 and padding["off"] > 10


def test_itm_train_row_counts_flops_and_the_fraction_of_peak():
    row = bench_steps.measure("itm", "train", 2, "off", iters=1, threads=1, warmup=0,
                              peak_tflops=1.0, overrides=TINY)
    assert row["task"] == "itm" and row["ms_per_sample"] > 0 and row["padded_rows_per_sample"] == 0
    assert row["tflops"] > 0 and abs(row["peak_fraction"] - row["tflops"]) < 1e-12
