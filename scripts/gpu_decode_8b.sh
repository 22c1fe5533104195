#!/usr/bin/env bash
# Issue 11 at Llama-3.1-8B's shapes (where the torchao anchors come from), on the lent GPU:
#   source scripts/device_setup.sh && bash scripts/gpu_decode_8b.sh
# 1. the CUDA convert test (every format, mxfp4 included); 2. per-call kernel times at the 8B fused shapes;
# 3. the batch-1 decode of the 8B-shaped model (fused layout), bf16 vs our int4 / nvfp4 / int8.
# Logs go to $OUT (or /tmp/gpu_decode_8b); each step has its own time limit so one slow step keeps the rest.
set -u
out=${OUT:-/tmp/gpu_decode_8b}
mkdir -p "$out"
timeout ${T_CONVERT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_convert.py 2>&1 \
  | grep -v DEBUG | tee "$out/test_gpu_convert.txt" | tail -6
timeout ${T_WO:-100} python3 benchmarks/bench_wo_linear.py --m 1 --shapes 8b-wqkv,8b-wo,8b-w13,8b-w2,8b-head \
  --out "$out/bench_wo_linear_8b.md" 2>&1 | grep -v "DEBUG\|Enum subclass" | tail -22
timeout ${T_BENCH:-330} python3 benchmarks/bench_decode.py --size 8b --layout fused --batches 1 \
  --variants bf16,int4,nvfp4,int8 --prefill ${PREFILL:-128} --budget-s ${BENCH_BUDGET:-270} \
  --out "$out/bench_decode_8b.md" 2>&1 | grep -v "DEBUG\|Enum subclass" | tail -12
