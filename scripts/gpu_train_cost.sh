#!/usr/bin/env bash
# Where the LOTION training step's cost goes on the lent GPU: recompiles / graph breaks of each case,
# the step-time benchmark, a per-kernel profile over 10 steps (one refresh at its real rate), then the
# step time under CUDA graphs (mode="reduce-overhead", dynamic=False) and the host's launch time per phase.
# Usage, from the repo root on the GPU machine:
#   source scripts/device_setup.sh && CASES="lotion-int4,lotion-int4-kfac_diag" bash scripts/gpu_train_cost.sh
set -u
OUTDIR=${OUT:-results}; mkdir -p "$OUTDIR"
CASES=${CASES:-lotion-int4,lotion-int4-kfac_diag}
PROFILE=${PROFILE:-plain,$(echo "$CASES" | sed 's/-/:/g')}
TORCH_LOGS="recompiles,graph_breaks" python benchmarks/bench_train_step.py --cases "plain,$CASES" \
  --windows "${WINDOWS:-5}" > "$OUTDIR/bench_train_step.txt" 2> "$OUTDIR/dynamo_logs.txt"
tail -20 "$OUTDIR/bench_train_step.txt"
grep -c "Recompiling\|Graph break" "$OUTDIR/dynamo_logs.txt"; grep -m 12 "Recompiling\|triggered by\|Graph break\|reason" "$OUTDIR/dynamo_logs.txt" | cut -c1-300
python benchmarks/profile_train_step.py --cases "$PROFILE" 2>&1 | grep -v Warning | tail -80
# README Costs' headline: the same cases under CUDA graphs with static shapes, and the host's launch time per phase
python benchmarks/bench_train_step.py --cases "plain,$CASES" --static --mode reduce-overhead 2>/dev/null | tail -12
python benchmarks/profile_host.py --static --cases "plain,$CASES" 2>/dev/null | tail -24
