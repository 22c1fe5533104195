#!/usr/bin/env bash
# LM results on the lent GPU (README.md). Usage, from the repo root on the GPU machine:
#   source scripts/device_setup.sh && bash scripts/gpu_lm.sh validate   # ~2 min: compile + speed check
#   source scripts/device_setup.sh && STEPS=1400 bash scripts/gpu_lm.sh main   # ~6 min: 50m, int4 + nvfp4
#   source scripts/device_setup.sh && STEPS=1500 bash scripts/gpu_lm.sh seeds  # ~3 min: small, int4 per tensor, 3 seeds
#   source scripts/device_setup.sh && STEPS=1500 bash scripts/gpu_lm.sh sweep  # ~2 min: LOTION settings, seed 1
#   source scripts/device_setup.sh && STEPS=1400 bash scripts/gpu_lm.sh seeds50m  # ~6 min: 50m int4, seeds 1 2
#   source scripts/device_setup.sh && STEPS=1200 bash scripts/gpu_lm.sh study50m  # ~7 min: curvature study (iv), 9 runs
# Records land in /tmp/lm/*.json (+ .log, .png); a summary table is printed and written to ${OUT:-results}/lm.
set -u
MODE=${1:-main}
DEST=/tmp/lm
SUMMARY=${OUT:-results}/lm
mkdir -p "$DEST" "$SUMMARY"
COMMON="--size 50m --device cuda --compile --batch 32 --seq 512 --lr 1e-3 --eval-windows 256"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$MODE" = validate ]; then
  for m in lotion qat; do
    python examples/train_lm.py --method $m --format int4 $COMMON --steps 40 --log-every 10 --out "$DEST/validate_$m.json"
  done
  exit 0
fi
if [ "$MODE" = sweep ]; then
  # why LOTION loses in the `seeds` setting: curvature_scale (default 32 = batch) and fp32 vs bf16, seed 1
  A="--method lotion --format int4 --block-size tensor --size small --device cuda --compile --batch 32 --seq 256 --lr 2e-3 --eval-windows 256 --steps ${STEPS:-1000} --seed 1 --quiet"
  for cs in 1 4 128; do python examples/train_lm.py $A --curvature-scale $cs --out "$DEST/sweep_cs$cs.json" 2>&1 | grep RESULT | sed "s/^/cs=$cs /" & done
  python examples/train_lm.py $A --dtype fp32 --out "$DEST/sweep_fp32.json" 2>&1 | grep RESULT | sed "s/^/cs=32,fp32 /" &
  python examples/train_lm.py $A --lr 1e-3 --out "$DEST/sweep_lr.json" 2>&1 | grep RESULT | sed "s/^/cs=32,lr=1e-3 /" &
  wait
  exit 0
fi
if [ "$MODE" = seeds50m ]; then
  # more seeds for the 50m int4 (block 32) table: ptq, qat, lotion at seeds ${SEEDS:-1 2}, all at once
  for seed in ${SEEDS:-1 2}; do
    for m in ptq qat lotion; do
      python examples/train_lm.py --method $m --format int4 $COMMON --steps "${STEPS:-1400}" --seed $seed --quiet \
        --out "$DEST/m50_s${seed}_${m}.json" > "$DEST/m50_s${seed}_${m}.log" 2>&1 &
    done
  done
  wait
  for f in "$DEST"/m50_s*.log; do echo "$(basename "$f" .log) $(grep -h RESULT "$f")"; done | tee "$SUMMARY/m50_seeds.txt"
  exit 0
fi
if [ "$MODE" = study50m ]; then
  # testbed (iv) of the curvature study: 50m GPT, the library default vs PTQ and QAT, all runs at once.
  # RUNS: "format:method:seed ..." (block: the format's default: int4 32, nvfp4 16); method lotion_held:
  # the default with LotionConfig(scale_grad=False); lotion_batch1: curvature_batch_fraction=1;
  # lotion_kfac: curvature="kfac_diag"
  for r in ${RUNS:-int4:ptq:0 int4:qat:0 int4:lotion:0 int4:ptq:1 int4:qat:1 int4:lotion:1 nvfp4:ptq:0 nvfp4:qat:0 nvfp4:lotion:0}; do
    IFS=: read -r fmt m seed <<< "$r"
    margs="--method $m"
    [ "$m" = lotion_held ] && margs="--method lotion --scale-grad off"  # the block scales held constant
    [ "$m" = lotion_batch1 ] && margs="--method lotion --curvature-batch-fraction 1"  # refresh on the whole batch
    [ "$m" = lotion_kfac ] && margs="--method lotion --curvature kfac_diag"  # the factored estimator
    python examples/train_lm.py $margs --format $fmt $COMMON --steps "${STEPS:-1200}" --seed $seed --quiet \
      --out "$DEST/${fmt}-default__${m}__s${seed}.json" > "$DEST/${fmt}-default__${m}__s${seed}.log" 2>&1 &
  done
  wait
  grep -L RESULT "$DEST"/*-default__*.log | while read -r f; do echo "FAILED: $f"; tail -5 "$f"; done
  python benchmarks/curvature_study.py --lm "$DEST" | tee "$SUMMARY/study50m.txt"
  exit 0
fi
if [ "$MODE" = seeds ]; then
  # small GPT (10.8M), int4 with one scale per tensor (a harsh format, so the methods separate), 3 seeds
  for seed in 0 1 2; do
    for m in ptq qat lotion lotion_sampled; do
      python examples/train_lm.py --method $m --format int4 --block-size tensor --size small --device cuda \
        --compile --batch 32 --seq 256 --lr 2e-3 --eval-windows 256 --steps "${STEPS:-1000}" --seed $seed --quiet \
        --out "$DEST/small_s${seed}_${m}.json" > "$DEST/small_s${seed}_${m}.log" 2>&1 &
    done
    [ $seed = 1 ] && wait
  done
  wait
  grep -h RESULT "$DEST"/small_*.log
  python - "$DEST" > "$SUMMARY/small_seeds.md" <<'PY'
import json, sys, glob, statistics as st
from tabulate import tabulate
by = {}
for f in sorted(glob.glob(sys.argv[1] + "/small_s*.json")):
    r = json.load(open(f)); by.setdefault(r["config"]["method"], []).append(r)
fp = st.mean(r["val_loss_fp"] for r in by["ptq"])
rows = [["full precision", f"{fp:.4f} ± {st.stdev(r['val_loss_fp'] for r in by['ptq']):.4f}", "-", "-"]]
for m in ("ptq", "qat", "lotion", "lotion_sampled"):
    q = [r["val_loss_quant"] for r in by[m]]; f_ = [r["val_loss_fp"] for r in by[m]]
    rows.append([m, f"{st.mean(f_):.4f} ± {st.stdev(f_):.4f}", f"{st.mean(q):.4f} ± {st.stdev(q):.4f}", f"{st.mean(q) - fp:+.4f}"])
r = by["ptq"][0]
print(f"{r['device']}, GPT small {r['params']/1e6:.1f}M, int4 per tensor, {r['tokens']:,} tokens/run, seeds 0-2, n={len(by['ptq'])}")
print(tabulate(rows, headers=["method", "fp val loss", "quantized val loss", "gap to fp"], tablefmt="github"))
print("per seed (quantized):", {m: [round(r['val_loss_quant'], 4) for r in rs] for m, rs in by.items()})
PY
  cat "$SUMMARY/small_seeds.md"
  exit 0
fi
STEPS=${STEPS:-600}
# The four methods of one format share the GPU concurrently (compilation is CPU-bound and overlaps).
for fmt in int4 nvfp4; do
  for m in ptq qat lotion lotion_sampled; do
    python examples/train_lm.py --method $m --format $fmt $COMMON --steps "$STEPS" --quiet \
      --out "$DEST/50m_${fmt}_${m}.json" > "$DEST/50m_${fmt}_${m}.log" 2>&1 &
  done
  wait
  cat "$DEST"/50m_${fmt}_*.log | grep -E "RESULT|Error|error" | head -20
done
python - "$DEST" <<'PY'
import json, sys, glob
from tabulate import tabulate
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/50m_*.json")):
    r = json.load(open(f)); c = r["config"]
    rows.append([c["format"], c["method"], f"{r['val_loss_fp']:.4f}", f"{r['val_loss_quant']:.4f}", r["tokens"], f"{r['train_seconds']:.0f}"])
print(tabulate(rows, headers=["format", "method", "fp val", "quant val", "tokens", "train s"], tablefmt="github"))
PY
cp "$DEST"/50m_*.json "$SUMMARY"/ 2>/dev/null || true
