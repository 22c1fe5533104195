#!/usr/bin/env bash
# Issue 11: the v3 GEMV with the block scale factored out of each word's sum (GEMV3_ROUND = 4, "v3r4") against
# the bit-exact v3 (ROUND 1, the default), per call at Llama-3.1-8B's fused shapes, M = 1 and 4, on the lent GPU:
#   source scripts/device_setup.sh && bash scripts/gpu_gemv_factored.sh
# The table goes to $OUT/bench_wo_linear_8b_factored.md (or /tmp/gpu_gemv_factored).
set -u
out=${OUT:-/tmp/gpu_gemv_factored}
mkdir -p "$out"
timeout ${T_WO:-300} python3 benchmarks/bench_wo_linear.py --m ${M:-1,4} --formats ${FORMATS:-int4,nvfp4,int8} \
  --kernels v3,v3r4 --shapes 8b-wqkv,8b-wo,8b-w13,8b-w2,8b-head \
  --out "$out/bench_wo_linear_8b_factored.md" 2>&1 | grep -v "DEBUG\|Enum subclass" | tail -60
