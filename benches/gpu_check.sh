#!/usr/bin/env bash
# GPU check for the scoring kernels (< 5 min): Triton kernel tests on CUDA tensors WITHOUT the
# interpreter, the Triton-vs-eager benchmark with device copy bandwidth in the same run, then
# the launch-configuration sweep (benches/tune_triton.py) whose JSON picks DEFAULT_CONFIGS.
# Works from a plain copy of the repo (no .venv, no compiled layerprune._core: the Rust backend
# is simply unavailable). Results go under "$OUT" (default runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; nothing to check" | tee "$OUT/gpu_check.txt"
    exit 3
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/gpu_check.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    | tee -a "$OUT/gpu_check.txt"

echo "== kernel tests (CUDA, no interpreter)" | tee -a "$OUT/gpu_check.txt"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py 2>&1 | tail -n 40 | tee -a "$OUT/gpu_check.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc

echo "== benchmark (Triton vs eager, device copy bandwidth)" | tee -a "$OUT/gpu_check.txt"
timeout 120 "$PY" benches/bench_scoring.py --device cuda --no-tp --reps 20 --json "$OUT/bench_scoring_gpu.json" 2>&1 \
    | tee -a "$OUT/gpu_check.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc

echo "== launch-configuration sweep" | tee -a "$OUT/gpu_check.txt"
timeout 150 "$PY" benches/tune_triton.py --device cuda --reps 10 --json "$OUT/tune_triton_gpu.json" 2>&1 \
    | tee -a "$OUT/gpu_check.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
exit $status
