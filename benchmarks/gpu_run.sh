#!/usr/bin/env bash
# The lab's GPU run, made for one call of a 15-minute GPU lease (benchmarks/README.md: how to start it):
#
#   benchmarks/gpu_run.sh RESULTS_DIR
#
# Needs the repository, the python3 that holds a CUDA torch, and (carried with the repository) the pinned
# transformers wheel in .gpu-wheels/ (`make gpu-wheels`); no network, no weights: the 7B model is random fp16.
# Steps, in this order, each under its own `timeout` (SIGABRT first, so Python's faulthandler prints every thread's
# stack; SIGKILL 15 s later) and all within GPU_RUN_BUDGET seconds (default 580; the device tool allows 600 a call);
# a step that fails or runs out of time does not stop the next one, and a later step gets what time is left:
#   env               one line first: GPU, torch, transformers (pinned?), the 2:4 backend       → env.log
#   prune-default     goal (a): bench-prune, default mode, Wanda 50 % and 2:4 at 128 × 4096       → bench-prune-default.json
#   prefill-lab       goal (c): the 7B model's 2:4 prefill at 4096 tokens, each 2:4 shape warmed  → prefill-lab.json
#   prefill-fused     goal (c): the same with q/k/v and gate/up fused (one process per kernel)   → prefill-lab-fused.json
#   prune-low-memory  goal (b): bench-prune, low-memory mode, its floor and masks from (a)        → bench-prune-low-memory.json
#   tests             the GPU tests (2:4 kernels, fusion, streams, pinned copies, graph capture)  → tests.log
# Optional, not in the default list: linears (each 7B weight shape alone, 512–8192 tokens) → linears.json.
# Every JSON file is rewritten after each row, so a step cut short keeps what it measured. Each step prints one
# summary line when it ends (also in RESULTS_DIR/summary.txt): from its own last line, or, when it ended early,
# from what its JSON holds. cuSPARSELt's algorithm search is refused in every step (LAB_NO_CUSPARSELT_SEARCH): a
# failed search broke the CUDA context of its process on an H200. GPU_STEPS="env tests" runs only those steps.
set -uo pipefail
ulimit -c 0  # SIGABRT must not dump the core of a process holding tens of GB
out=${1:?usage: benchmarks/gpu_run.sh RESULTS_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 LAB_NO_CUSPARSELT_SEARCH=1
py=${PYTHON:-python3}
steps=" ${GPU_STEPS:-env prune-default prefill-lab prefill-fused prune-low-memory tests} "
deadline=$(($(date +%s) + ${GPU_RUN_BUDGET:-580}))
cap=${GPU_STEP_LIMIT:-600}  # the tests' dry run caps every step
: >"$out/summary.txt"

# The pinned transformers (and anything else in the folder) goes into a private site folder ahead of the machine's.
wheels=${GPU_WHEELS:-.gpu-wheels}
site=${TMPDIR:-/tmp}/wanda-lab-site
path=$PWD
if compgen -G "$wheels/*.whl" >/dev/null; then
    rm -rf "$site"
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        >"$out/wheels.log" 2>&1; then
        path="$site:$PWD"
    else
        echo "wheels: could not install $wheels/*.whl (wheels.log); the machine's own packages are used"
    fi
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS JSON COMMAND... (JSON: the file the step writes row by row, or "")
    local name=$1 want=$2 json=$3 start rc limit left verdict line
    shift 3
    [[ $steps == *" $name "* ]] || return 0
    start=$(date +%s)
    left=$((deadline - start))
    limit=$((want < cap ? want : cap))
    limit=$((limit < left ? limit : left))
    if [ "$limit" -lt 5 ]; then
        printf '%-17s %-30s %4d s  %s\n' "$name" "SKIPPED: budget spent" 0 "" | tee -a "$out/summary.txt"
        return 0
    fi
    echo "=== $name (limit ${limit} s): $*" >>"$out/$name.log"
    timeout -s ABRT -k 15 "$limit" "$@" >>"$out/$name.log" 2>&1
    rc=$?
    verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 134 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT or aborted (rc $rc)"
    elif [ "$rc" -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    line=$(tail -n 1 "$out/$name.log")
    if [ "$rc" -ne 0 ] && [ -n "$json" ]; then  # the step's own last line is a stack or an error: ask its JSON
        line=$(timeout 60 "$py" benchmarks/gpu_summary.py "$json" 2>&1 | tail -n 1)
    fi
    printf '%-17s %-30s %4d s  %s\n' "$name" "$verdict" "$(($(date +%s) - start))" "${line:0:220}" \
        | tee -a "$out/summary.txt"
}

default_json="$out/bench-prune-default.json"
step env 30 "" "$py" benchmarks/gpu_env.py
step prune-default 170 "$default_json" "$py" -m labutils bench-prune --modes default --json "$default_json"
for kernel in lab lab-fused; do
    step "prefill-${kernel/lab-fused/fused}" 100 "$out/prefill-$kernel.json" "$py" benchmarks/gpu_semistructured.py \
        --parts model --kernels "$kernel" --lengths 4096 --warm-linears --verify-tokens 4096 --memory-tokens 4096 \
        --decode-tokens 0 --warmup 2 --repeats 5 --out "$out/prefill-$kernel.json"
done
baseline=()
[ -s "$default_json" ] && baseline=(--baseline "$default_json")  # else the step measures its own floor
step prune-low-memory 120 "$out/bench-prune-low-memory.json" "$py" -m labutils bench-prune --modes low-memory \
    "${baseline[@]}" --json "$out/bench-prune-low-memory.json"
step tests 600 "" "$py" -m pytest -q -rs -p no:cacheprovider -m "not slow" tests/test_sparse24.py \
    tests/test_sparse24_fusion.py tests/test_offload.py tests/test_bench_prune.py \
    tests/test_sparsity.py tests/test_graphs_capture.py
step linears 120 "$out/linears.json" "$py" benchmarks/gpu_semistructured.py --parts linears --fused-shapes \
    --out "$out/linears.json"
