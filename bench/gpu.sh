#!/usr/bin/env bash
# The whole bench on one GPU in under 8 minutes; results in bench/results/gpu/ (JSON).
#
#   bench/gpu.sh                          # cuda, paper sizes, peak 989 TFLOPS (H100/H200 dense bf16)
#   bench/gpu.sh --peak-tflops 312        # A100
#   bench/gpu.sh --device cpu --tiny      # the same path on a CPU at toy sizes (a check, not a bench)
#
# Sections (each under its own time limit, rows written as they finish, so a slow section
# keeps what it measured): train/eval/search steps of vqa, vgd, itm at B = 32, 64 in fp32 and
# bf16, eager; VQA with and without length bucketing (10-100 regions); the same steps
# compiled (torch.compile, inductor; B = 64); the feature loader; the ITM retrieval
# evaluation. Every step row prints samples/s and the fraction of the bf16 peak reached
# (FLOPs of the step counted by torch.utils.flop_counter).
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
PEAK=989
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --peak-tflops) PEAK="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (expected --device, --peak-tflops, --tiny)" >&2; exit 2 ;;
  esac
done
OUT=bench/results/gpu
mkdir -p "$OUT"
if [ "$TINY" = 1 ]; then
  SIZES=(--set HSIZE=64 FLAT_MLP_SIZE=64 REL_SIZE=16 --batch 2 --iters 1 --warmup 1)
  IMAGES=(--images 2 --captions 4 --hsize 64)
  LOADER=(--images 20 --seconds 0.2)
  LIMIT=1
else
  SIZES=(--batch 32 64 --iters 4 --warmup 2)
  IMAGES=(--images 32 --captions 160)
  LOADER=(--images 500 --seconds 1)
  LIMIT=0
fi
THREADS=16
AMPS=(off bf16)
ITM_AMP=bf16
# on a CPU: 2 threads, fp32 only (oneDNN's bf16 LSTM fails at small sizes on some CPUs)
[ "$DEVICE" = cpu ] && THREADS=2 && ITM_AMP=off && AMPS=(off)
COMMON=(--device "$DEVICE" --peak-tflops "$PEAK" --in-process --threads "$THREADS")

section() {  # name, seconds, command...: run it under a time limit, say when it was cut
  local name="$1" seconds="$2"; shift 2
  echo "== $name (limit ${seconds} s)"
  local t0=$SECONDS
  timeout "$seconds" "$@"
  local rc=$?
  [ $rc = 124 ] && echo "!! $name stopped at its ${seconds} s limit; the rows above are kept"
  [ $rc != 0 ] && [ $rc != 124 ] && echo "!! $name failed (exit $rc)"
  echo "   ($name: $((SECONDS - t0)) s)"
}

section "steps, eager" 170 python3 bench/bench_steps.py "${COMMON[@]}" "${SIZES[@]}" \
  --tasks vqa vgd itm --amp "${AMPS[@]}" --out "$OUT/steps_eager.json"
section "steps, VQA bucketed by region count or not" 70 python3 bench/bench_steps.py "${COMMON[@]}" \
  "${SIZES[@]}" --tasks vqa --steps train eval --amp "${AMPS[@]}" --bucket off on \
  --out "$OUT/steps_bucket.json"
if [ "$DEVICE" = cpu ] && [ "$LIMIT" = 1 ]; then
  echo "== steps, compiled: skipped with --tiny on a CPU (inductor's C++ builds take minutes)"
else
  COMPILED_SIZES=("${SIZES[@]}")
  [ "$LIMIT" = 0 ] && COMPILED_SIZES=(--batch 64 --iters 4 --warmup 3)
  section "steps, compiled" 180 python3 bench/bench_steps.py "${COMMON[@]}" "${COMPILED_SIZES[@]}" \
    --tasks vqa itm vgd --amp bf16 off --compile on --out "$OUT/steps_compiled.json"
fi
section "feature loader" 30 python3 bench/bench_loader.py "${LOADER[@]}" --out "$OUT/loader.json"
section "ITM retrieval evaluation" 30 python3 bench/bench_itm_eval.py "${IMAGES[@]}" \
  --device "$DEVICE" --amp "$ITM_AMP" --out "$OUT/itm_eval.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for name in ("steps_eager", "steps_bucket", "steps_compiled"):
    path = Path(sys.argv[1]) / f"{name}.json"
    if path.is_file():
        rows += [r for r in json.loads(path.read_text()) if "error" not in r]
print(f"== summary: {len(rows)} step rows; best samples/s per task and step")
best = {}
for r in rows:
    key = (r["task"], r["step"])
    if key not in best or r["samples_per_s"] > best[key]["samples_per_s"]:
        best[key] = r
for (task, step), r in sorted(best.items()):
    print(f"  {task:<4} {step:<14} {r['samples_per_s']:9.1f} samples/s  B={r['batch']} "
          f"{r['amp']} compile={r['compile']} bucket={r['bucket']}  "
          f"{100 * r['peak_fraction']:.1f} % of the bf16 peak")
EOF
