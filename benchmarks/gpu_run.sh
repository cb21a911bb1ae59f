#!/usr/bin/env bash
# Every GPU check and measurement of the lab in one run, for a 15-minute GPU lease (≈ 7 min on one H200):
#
#   benchmarks/gpu_run.sh RESULTS_DIR
#
# Steps, each under its own `timeout` (SIGABRT first, so Python's faulthandler prints every thread's stack, SIGKILL
# 15 s later); a step that fails or runs out of time does not stop the next one:
#   env      versions, GPU, cuSPARSELt, the _cslt_sparse_mm schema            → RESULTS_DIR/run.log
#   tests    the GPU tests (2:4 kernels, fusion, streams, graph capture)      → RESULTS_DIR/tests.log
#   linears  each Llama-2-7B weight shape alone, fused shapes too, 512–8192 tokens → RESULTS_DIR/linears.json
#   prune    bench-prune: floor, Wanda 50 % and 2:4, default and low-memory   → RESULTS_DIR/bench-prune.json
#   prefill  the whole 7B model 2:4 vs dense: lab, lab fused and stock kernels, eager and CUDA graphs, 512–8192
#            tokens (longest last), and decode                               → RESULTS_DIR/semistructured.json
# GPU_STEPS="env tests prefill" runs only the steps named. The last lines printed are one summary line per step (also in RESULTS_DIR/summary.txt). Copy the JSON files to
# benchmarks/results/ and commit them. Needs no network and no weights: the 7B model is random (fp16).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh RESULTS_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `make setup` on a bare GPU machine
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
steps=" ${GPU_STEPS:-env tests linears prune prefill} "  # GPU_STEPS="env tests prefill": only those, in this order
summary=()

step() {  # step NAME SECONDS LOG COMMAND...
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    [[ $steps == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "=== $name (limit ${limit} s): $*" >>"$log"
    timeout -s ABRT -k 15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - start)) verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 134 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT or aborted (rc $rc)"
    elif [ "$rc" -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    summary+=("$(printf '%-8s %-28s %4d s  %s' "$name" "$verdict" "$took" "$(tail -n 1 "$log" | cut -c1-110)")")
}

step env 30 "$out/run.log" "$py" - <<'PY'
import subprocess, torch, transformers
print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version",
                      "--format=csv"], capture_output=True, text=True).stdout)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| transformers", transformers.__version__)
print("cuSPARSELt", torch.backends.cusparselt.is_available(), torch.backends.cusparselt.version())
print(torch.ops.aten._cslt_sparse_mm.default._schema)
print("torch._C._cusparselt.mm_search:", hasattr(getattr(torch._C, "_cusparselt", None), "mm_search"))
print("env ok:", torch.cuda.get_device_name(0))
PY
step tests 80 "$out/tests.log" "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_sparse24.py tests/test_sparse24_fusion.py tests/test_streaming.py tests/test_graphs_capture.py
step linears 50 "$out/run.log" "$py" benchmarks/gpu_semistructured.py --parts linears --fused-shapes \
    --out "$out/linears.json"
step prune 230 "$out/run.log" "$py" -m labutils bench-prune --json "$out/bench-prune.json"
step prefill 150 "$out/run.log" "$py" benchmarks/gpu_semistructured.py --parts model --kernels lab lab-fused stock \
    --lengths 512 2048 4096 8192 --warmup 1 --repeats 3 --out "$out/semistructured.json"

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
