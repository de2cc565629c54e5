"""The bench's new rows on a CPU at toy sizes: bucketed batches pad less, a step row counts
its FLOPs and the fraction of the given peak (bench/gpu.sh runs these rows on a GPU); the
comparison with the original code refuses a folder that is no checkout of it."""
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_original  # noqa: E402
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


def test_itm_train_row_counts_flops_the_fraction_of_peak_and_where_time_goes():
    row = bench_steps.measure("itm", "train", 2, "off", iters=1, threads=1, warmup=0,
                              peak_tflops=1.0, overrides=TINY, profile=3)
    assert row["task"] == "itm" and row["ms_per_sample"] > 0 and row["padded_rows_per_sample"] == 0
    assert row["tflops"] > 0 and abs(row["peak_fraction"] - row["tflops"]) < 1e-12
    top = row["top_ops"]                 # --profile 3: the step's three costliest operators
    assert len(top) == 3 and all(op["op"].startswith("aten::") for op in top)
    assert top[0]["self_ms"] >= top[1]["self_ms"] >= top[2]["self_ms"] > 0
    assert 0 < sum(op["share"] for op in top) < 1


def test_original_bench_names_the_file_a_wrong_checkout_lacks(tmp_path):
    for rel in bench_original.REQUIRED[:-1]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert bench_original.missing_file(tmp_path) == "mmnas/utils/optimizer.py"
    out = subprocess.run([sys.executable, str(Path(bench_original.__file__)), "--original",
                          "/nonexistent", "--out", str(tmp_path / "original.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "mmnas/model/full_vqa.py" in out.stderr
    assert "/nonexistent" in out.stderr and not (tmp_path / "original.json").exists()
