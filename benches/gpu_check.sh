#!/usr/bin/env bash
# The GPU check (at most 8 minutes on one H100): the whole pipeline on CUDA, one JSON file per step under "$OUT"
# (default runs/gpu_check) and one summary table at the end.
#
#   1. model: SmolLM2-135M resolved (its GGUF de-quantized once), or MODEL=PATH;
#   2. prune_device: `layerprune prune --model smollm2-135m --ratio 0.25 --device cuda` (the default method);
#   3. eval_device_32k / eval_device_4k: its WikiText-2 perplexity on CUDA, first 32,768 and 4,096 tokens;
#   4. prune_cpu, eval_cpu_4k, eval_cross_4k: the same prune on the CPU, its perplexity on the CPU, and the
#      CUDA-pruned model on the CPU;
#   5. compare: the kept KV heads and MLP channels of the two prunes must be the same, their PPL within 0.5%
#      (benches/gpu_check_compare.py);
#   6. heal: `layerprune heal` of the pruned model from the dense one on the device, then its PPL;
#   7. sequential: the layer-by-layer engine on CUDA over a random bf16 checkpoint of Llama-3.1-8B's shapes
#      (4 layers) written to this disk: time per layer, peak device memory, 70B projected (bench_sequential.py);
#   8. kernel_tests, bench_scoring, tune_triton: the Triton tests without the interpreter, Triton vs eager with
#      the copy bandwidth, the launch-configuration sweep.
#
# Each step has a time limit inside a global budget (GPU_CHECK_BUDGET_S, default 450 s); a step that fails does
# not stop the others. Exit 0: every step passed (a step skipped on purpose passes); 1: a step failed, timed out or
# could not run; 2: bad arguments; 3: no CUDA device visible.
#
# Works from a plain copy of the repository with torch, triton and transformers installed and no registry access:
# no .venv needed. The pipeline needs the compiled Rust extension (python/layerprune/_core.abi3.so: the
# allocation solvers); without it those steps are reported as not run and nothing is built here.
#
#   bash benches/gpu_check.sh                                # on a machine with a GPU
#   GPU_CHECK_DEVICE=cpu bash benches/gpu_check.sh --quick   # the dry run: the same steps on tiny shapes, on CPU
#
# Environment: OUT (results), PYTHON (interpreter, default python3), DATA_DIR (WikiText-2 raw; default
# $LAYERPRUNE_DATA_DIR, else ../shared/data/wikitext-2-raw), MODEL (default smollm2-135m), GPU_CHECK_DEVICE
# (default cuda), GPU_CHECK_BUDGET_S, HEAL_ARGS (extra flags for `layerprune heal`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --quick or --help)" >&2; exit 2 ;;
    esac
done

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check}"
DATA_DIR="${DATA_DIR:-${LAYERPRUNE_DATA_DIR:-$ROOT/../shared/data/wikitext-2-raw}}"
MODEL="${MODEL:-smollm2-135m}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
MIN_STEP_S=5
TAIL=12
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
case $DEVICE in
    cuda*) unset TRITON_INTERPRET ;;
    cpu) export TRITON_INTERPRET=1 ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda[:N] or cpu, got $DEVICE" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
STEPS="$OUT/steps" LOGS="$OUT/logs" MODELS="$OUT/models" EVALS="$OUT/eval"
rm -rf "$STEPS" "$LOGS" "$EVALS"  # what an earlier run left must not pass for this one's
rm -f "$OUT/compare.json" "$OUT/sequential.json" "$OUT/bench_scoring.json" "$OUT/tune_triton.json" "$OUT/summary.json"
mkdir -p "$STEPS" "$LOGS" "$MODELS" "$EVALS"
exec > >(tee "$OUT/gpu_check.txt") 2>&1

if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; nothing to check (GPU_CHECK_DEVICE=cpu ... --quick is the dry run)"
    exit 3
fi

if [ $QUICK -eq 1 ]; then  # tiny shapes: every step in about a minute on 2 CPU cores
    PRUNE_EXTRA=(--calib-samples 4 --calib-seq-len 32 --refit-samples 8 --refit-seq-len 64 --fisher-samples 2
                 --threads 1)
    EVAL_EXTRA="--threads 1"
    EVAL_TOKENS=2048 CMP_TOKENS=1024
    SEQ_ARGS=(--shape tiny --layers 2 --threads 1)
    KERNEL_SELECT=(-k "not 40 and not every_tuning_candidate")
else
    PRUNE_EXTRA=()
    EVAL_EXTRA=""
    EVAL_TOKENS=32768 CMP_TOKENS=4096
    SEQ_ARGS=(--shape Llama-3.1-8B --layers 4 --threads 4)
    KERNEL_SELECT=()
fi
if [ "$DEVICE" = cpu ]; then
    BENCH_ARGS=(--device cpu --no-tp --shapes 256x384 --reps 2)
    TUNE_ARGS=(--device cpu --shapes 128x64 --dtypes bfloat16 --reps 1)
else
    BENCH_ARGS=(--device cuda --no-tp --reps 20)
    TUNE_ARGS=(--device cuda --reps 10)
fi

# ---- the environment -----------------------------------------------------------------------------------------
CORE=0
"$PY" -c "import layerprune._core" 2>/dev/null && CORE=1
"$PY" - "$OUT/env.json" "$DEVICE" "$QUICK" "$CORE" "$BUDGET" "$MODEL" "$DATA_DIR" <<'EOF'
import json, os, platform, subprocess, sys
out, device, quick, core, budget, model, data_dir = sys.argv[1:]
env = {"device": device, "quick": quick == "1", "core": core == "1", "budget_seconds": int(budget), "model": model,
       "data_dir": data_dir, "python": platform.python_version(), "cpus": os.cpu_count()}
from importlib import metadata
for name in ("torch", "triton", "transformers"):
    try:
        env[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        env[name] = "not installed"
env["device_name"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
if device.startswith("cuda"):
    try:
        import torch
        env["cuda"] = torch.version.cuda
        env["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["device_memory_bytes"] = props.total_memory
        env["sms"] = props.multi_processor_count
    except Exception as err:  # reported, never fatal here
        env["device_name"] = f"unavailable: {err}"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
with open(out, "w") as f:
    json.dump(env, f, indent=2)
print(f"gpu_check: {env.get('device_name')}; torch {env.get('torch')}, triton {env.get('triton')}, "
      f"transformers {env.get('transformers')}; layerprune._core {'built' if env['core'] else 'MISSING'}; "
      f"{'quick' if env['quick'] else 'full'} run, budget {budget} s")
if env.get("nvidia_smi"):
    print("nvidia-smi:", env["nvidia_smi"])
EOF

# ---- steps ---------------------------------------------------------------------------------------------------
declare -A STATUS

record() {  # record NAME KIND STATUS REASON
    STATUS[$1]=$3
    echo "== $1: $3${4:+ ($4)}"
    "$PY" benches/gpu_check_summary.py record "$OUT" "$1" "$2" "$3" --reason "$4"
}

# run_step NAME KIND LIMIT [--needs STEP[,STEP]] [--artifact PATH]... -- COMMAND...
run_step() {
    local name=$1 kind=$2 cap=$3
    shift 3
    local arts=() needs="" need
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        case $1 in
            --needs) needs=$2; shift 2 ;;
            --artifact) arts+=(--artifact "$2"); shift 2 ;;
            *) echo "run_step: bad option $1" >&2; return 2 ;;
        esac
    done
    shift
    for need in ${needs//,/ }; do
        if [ "${STATUS[$need]:-}" != ok ]; then
            record "$name" "$kind" not-run "needs step $need, which did not pass (${STATUS[$need]:-not run})"
            return 0
        fi
    done
    local left=$((BUDGET - SECONDS)) limit=$cap
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        record "$name" "$kind" not-run "the time budget of ${BUDGET} s is spent"
        return 0
    fi
    echo "== $name (time limit ${limit} s)"
    local log="$LOGS/$name.log" t0 t1 rc status=ok
    { printf '$'; printf ' %q' "$@"; printf '\n'; } >"$log"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n "$TAIL" "$log" | sed 's/^/    /'
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
    STATUS[$name]=$status
    echo "-- $name: $status in $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s"
    "$PY" benches/gpu_check_summary.py record "$OUT" "$name" "$kind" "$status" --rc "$rc" \
        --seconds "$(awk "BEGIN {print $t1 - $t0}")" --limit "$limit" --log "$log" ${arts[@]+"${arts[@]}"}
}

# what the pipeline needs before it can run
BLOCKED=""
[ $CORE -eq 1 ] || BLOCKED="layerprune._core is not built (the allocation solvers are Rust): build it (make setup, or maturin develop --release) or bring python/layerprune/_core.abi3.so along; this script builds nothing"
if [ -z "$BLOCKED" ] && { [ ! -f "$DATA_DIR/test.txt" ] || [ ! -f "$DATA_DIR/valid.txt" ]; }; then
    BLOCKED="no WikiText-2 raw test.txt / valid.txt in $DATA_DIR (set DATA_DIR)"
fi

if [ -n "$BLOCKED" ]; then
    for name in model prune_device eval_device_32k eval_device_4k prune_cpu eval_cpu_4k eval_cross_4k compare heal sequential; do
        record "$name" plain not-run "$BLOCKED"
    done
else
    if [ $QUICK -eq 1 ]; then
        # tiny shapes of the data too: the first lines of WikiText-2 (tokenizing all of it is most of a tiny eval)
        mkdir -p "$OUT/data"
        for split in test valid; do head -n 600 "$DATA_DIR/$split.txt" >"$OUT/data/$split.txt"; done
        DATA_DIR="$OUT/data"
        MODEL_DIR="$MODELS/tiny"
        rm -rf "$MODEL_DIR"
        run_step model model 120 -- "$PY" benches/gpu_check_tiny.py "$MODEL_DIR" --data-dir "$DATA_DIR"
    else
        MODEL_DIR="$MODEL"
        run_step model model 120 -- "$PY" -c "
import sys
from layerprune.errors import LayerpruneError
from layerprune.models import resolve_model
try:
    print('model:', resolve_model(sys.argv[1]))
except LayerpruneError as err:
    sys.exit(f'gpu_check: {err}')" "$MODEL"
    fi
    export PY MODEL_DIR DATA_DIR EVAL_EXTRA
    export PRUNE_EXTRA_STR="${PRUNE_EXTRA[*]:-}"
    prune() {  # prune DEVICE OUT: the default method at 0.25
        "$PY" -m layerprune prune --model "$MODEL_DIR" --ratio 0.25 --device "$1" --data-dir "$DATA_DIR" --no-progress \
            --overwrite --out "$2" $PRUNE_EXTRA_STR
    }
    evaluate() {  # evaluate MODEL DEVICE TOKENS JSON
        "$PY" -m layerprune eval --model "$1" --device "$2" --max-tokens "$3" --data-dir "$DATA_DIR" --no-progress --json "$4" \
            $EVAL_EXTRA
    }
    export -f prune evaluate

    run_step prune_device prune 150 --needs model --artifact "$MODELS/prune_device" -- \
        bash -c 'prune "$0" "$1"' "$DEVICE" "$MODELS/prune_device"
    run_step eval_device_32k eval 90 --needs prune_device --artifact "$EVALS/device_32k.json" -- \
        bash -c 'evaluate "$@"' _ "$MODELS/prune_device" "$DEVICE" "$EVAL_TOKENS" "$EVALS/device_32k.json"
    run_step eval_device_4k eval 60 --needs prune_device --artifact "$EVALS/device_4k.json" -- \
        bash -c 'evaluate "$@"' _ "$MODELS/prune_device" "$DEVICE" "$CMP_TOKENS" "$EVALS/device_4k.json"
    run_step prune_cpu prune 180 --needs model --artifact "$MODELS/prune_cpu" -- \
        bash -c 'prune "$0" "$1"' cpu "$MODELS/prune_cpu"
    run_step eval_cpu_4k eval 60 --needs prune_cpu --artifact "$EVALS/cpu_4k.json" -- \
        bash -c 'evaluate "$@"' _ "$MODELS/prune_cpu" cpu "$CMP_TOKENS" "$EVALS/cpu_4k.json"
    run_step eval_cross_4k eval 60 --needs prune_device --artifact "$EVALS/cross_4k.json" -- \
        bash -c 'evaluate "$@"' _ "$MODELS/prune_device" cpu "$CMP_TOKENS" "$EVALS/cross_4k.json"
    run_step compare compare 30 --needs prune_device,prune_cpu,eval_device_4k,eval_cpu_4k \
        --artifact "$OUT/compare.json" -- \
        "$PY" benches/gpu_check_compare.py --device-report "$MODELS/prune_device/report.json" \
        --cpu-report "$MODELS/prune_cpu/report.json" --device-eval "$EVALS/device_4k.json" \
        --cpu-eval "$EVALS/cpu_4k.json" --cross-eval "$EVALS/cross_4k.json" --json "$OUT/compare.json"

    # heal: distil the pruned model from the dense one on the device, then evaluate it (--quick: 2 short steps)
    if [ $QUICK -eq 1 ]; then HEAL_DEFAULT="--tokens 256 --seq-len 32 --batch-size 4 --threads 1"
    else HEAL_DEFAULT="--tokens 65536 --precision bfloat16"; fi
    export HEAL_ARGS="${HEAL_ARGS:-$HEAL_DEFAULT}"
    run_step heal eval 300 --needs prune_device --artifact "$EVALS/healed_4k.json" -- bash -c '
        "$PY" -m layerprune heal --model "$0" --teacher "$MODEL_DIR" --device "$1" --data-dir "$DATA_DIR" \
            --no-progress --overwrite --out "$2" $HEAL_ARGS &&
        evaluate "$2" "$1" "$3" "$4"' "$MODELS/prune_device" "$DEVICE" "$MODELS/healed" "$CMP_TOKENS" "$EVALS/healed_4k.json"

    mkdir -p "$OUT/work"
    run_step sequential sequential 150 --artifact "$OUT/sequential.json" -- \
        "$PY" benches/bench_sequential.py "${SEQ_ARGS[@]}" --device "$DEVICE" --workdir "$OUT/work" \
        --json "$OUT/sequential.json"
fi

# ---- kernels -------------------------------------------------------------------------------------------------
run_step kernel_tests pytest 120 -- \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py ${KERNEL_SELECT[@]+"${KERNEL_SELECT[@]}"}
run_step bench_scoring bench_scoring 60 --artifact "$OUT/bench_scoring.json" -- \
    "$PY" benches/bench_scoring.py "${BENCH_ARGS[@]}" --json "$OUT/bench_scoring.json"
if [ $QUICK -eq 1 ] && [ "$DEVICE" = cpu ]; then
    record tune_triton tune skipped "--quick on CPU: the sweep through the Triton interpreter times nothing (tests/test_benches.py runs it)"
else
    run_step tune_triton tune 90 --artifact "$OUT/tune_triton.json" -- \
        "$PY" benches/tune_triton.py "${TUNE_ARGS[@]}" --json "$OUT/tune_triton.json"
fi

"$PY" benches/gpu_check_summary.py table "$OUT" --wall "$SECONDS"
