#!/usr/bin/env bash
# Every GPU measurement of the lab in one run, about 6 minutes on an H200 (no network, no weights needed):
#   1. bench-prune: the two-pass forward floor, Wanda 50 % and 2:4 in the default and the low-memory mode,
#      peak GPU memory, mask hashes (Llama-2-7B shapes, random fp16 weights, 128 × 4096 calibration tokens);
#   2. the 2:4 prefill speedup of the lab's SparseLinear24 kernel, 512–8192 tokens, and decode.
# JSON goes to benchmarks/results/<date>-*.json; commit it and re-execute 04-Benchmark to show it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `make setup` on a bare GPU machine
day=$(date +%F)
mkdir -p benchmarks/results
python -m labutils bench-prune --json "benchmarks/results/$day-bench-prune.json"
python benchmarks/gpu_semistructured.py --kernels lab stock --alg-search-tokens 4096 --warmup 1 --repeats 3 \
  --out "benchmarks/results/$day-semistructured.json"
