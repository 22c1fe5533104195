#!/usr/bin/env bash
# LOTION's compiled GPT-2 step without CUDA graphs is bound by the host's kernel launches (README Costs).
# This times plain and LOTION int4 under torch.compile's default mode with Inductor's own levers on launch
# time: the default Python wrapper, the C++ wrapper (cpp_wrapper) and horizontal fusion (combo_kernels).
#   source scripts/device_setup.sh && [OPTIONS="none cpp_wrapper=True combo_kernels=True"] bash scripts/gpu_host_overhead.sh
# (each word of OPTIONS is one bench run: "none", or --inductor's comma list of key=value)
set -u
out=${OUT:-/tmp/gpu_host_overhead}
mkdir -p "$out"
for opts in ${OPTIONS:-none cpp_wrapper=True}; do
  o=$([ "$opts" = none ] && echo "" || echo "$opts")
  timeout ${T_EACH:-290} python3 benchmarks/bench_train_step.py --cases ${CASES:-plain,lotion-int4} \
    --windows ${WINDOWS:-5} --warmup ${WARMUP:-40} --inductor "$o" 2>&1 | grep -v "DEBUG\|Enum subclass\|Warning" \
    | tee "$out/bench_train_step_${opts//[=,]/_}.txt" | tail -9
done
