#!/usr/bin/env bash
# The hand-written RTN fake-quantization kernel (backends/triton_fake_quant.py) on the lent GPU:
# its gpu tests, the lowering's gpu tests (16-bit weights take the kernel under torch.compile), then the
# op benchmark (Inductor's code vs the kernel vs copy). Usage, from the repo root on the GPU machine:
#   source scripts/device_setup.sh && bash scripts/gpu_fake_quant.sh
set -u
OUTDIR=${OUT:-results}; mkdir -p "$OUTDIR"
python -m pytest -q -m gpu tests/test_triton_fake_quant.py tests/test_gpu_lowering.py 2>&1 | tail -15 | tee "$OUTDIR/fake_quant_tests.txt"
python benchmarks/bench_smooth_op.py --sizes "${SIZES:-4096,8192}" 2>&1 | grep -v Warning | tee "$OUTDIR/bench_smooth_op.txt"
