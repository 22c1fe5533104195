#!/usr/bin/env bash
# GPU checks of the Triton weight-only kernels, the decode benchmark and its profile (issue 11), on the lent GPU:
#   source scripts/device_setup.sh && bash scripts/gpu_decode.sh
# Logs go to $OUT (or /tmp/gpu_decode). Each step has its own time limit so one slow step keeps the rest.
set -u
out=${OUT:-/tmp/gpu_decode}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/device.txt" 2>&1
timeout ${T_KERNELS:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_matmul.py --durations=5 2>&1 \
  | grep -v DEBUG | tee "$out/test_triton_matmul_gpu.txt" | tail -15
timeout ${T_WO:-90} python3 benchmarks/bench_wo_linear.py --m 1,8,512 --out "$out/bench_wo_linear.md" 2>&1 \
  | grep -v DEBUG | tail -5
timeout ${T_BENCH:-330} python3 benchmarks/bench_decode.py --budget-s ${BENCH_BUDGET:-240} --out "$out/bench_decode.md" 2>&1 \
  | grep -v "DEBUG\|Enum subclass" | tee "$out/bench_decode.log" | tail -25
timeout ${T_CONVERT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_convert.py -k Lotion 2>&1 \
  | grep -v DEBUG | tee "$out/test_gpu_convert.txt" | tail -8
timeout ${T_PROFILE:-200} python3 benchmarks/profile_decode.py --variants bf16,int4 2>&1 \
  | grep -v "DEBUG\|Enum subclass" | tee "$out/profile_decode.txt" | tail -25
