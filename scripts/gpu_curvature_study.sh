#!/usr/bin/env bash
# The LM testbed of the curvature study (README "Choosing the default"): small GPT (10.8M) on the
# stdlib corpus, int4 per row and per tensor, seeds 0-2, PTQ / QAT / LOTION variants, all runs at
# once on one GPU. Usage on the GPU machine, from the repo root:
#   source scripts/device_setup.sh && STEPS=1200 bash scripts/gpu_curvature_study.sh
# VARIANTS: names from the case list below. Records: ${DEST:-/tmp/study}/*.json; the table goes to stdout and
# ${OUT:-results}/curvature_lm.txt.
set -u
DEST=${DEST:-/tmp/study}; mkdir -p "$DEST" "${OUT:-results}"
STEPS=${STEPS:-1200}
SEEDS=${SEEDS:-0 1 2}
BLOCKS=${BLOCKS:-row tensor}
VARIANTS=${VARIANTS:-ptq qat lotion}
COMMON="--size small --device cuda --compile --batch 32 --seq 256 --lr 2e-3 --eval-windows 256 --steps $STEPS --quiet"
args_for() {  # variant -> train_lm.py arguments (lotion = the library default)
  case $1 in
    ptq) echo "--method ptq";;
    qat) echo "--method qat";;
    lotion) echo "--method lotion";;
    lotion_ema) echo "--method lotion --curvature ema";;
    lotion_kfac) echo "--method lotion --curvature kfac_diag";;
    lotion_held) echo "--method lotion --scale-grad off";;  # the scales held constant (before scale_grad)
    lotion_lam0.1) echo "--method lotion --lam 0.1 --lam-warmup 0";;
    lotion_lam0.3) echo "--method lotion --lam 0.3 --lam-warmup 0";;
    lotion_lam0.5) echo "--method lotion --lam 0.5 --lam-warmup 0";;
    lotion_lam1) echo "--method lotion --lam 1 --lam-warmup 0";;
    lotion_warm500) echo "--method lotion --lam 1 --lam-warmup 500";;
    lotion_every20) echo "--method lotion --curvature-every 20";;
    lotion_batch0.5) echo "--method lotion --curvature-batch-fraction 0.5";;
    lotion_batch0.25) echo "--method lotion --curvature-batch-fraction 0.25";;
    lotion_batch1) echo "--method lotion --curvature-batch-fraction 1";;
    lotion_qat_half) echo "--method lotion --qat-from-step $((STEPS / 2))";;  # LOTION, then QAT from half the run
    lotion_qat_tenth) echo "--method lotion --qat-from-step $((STEPS * 9 / 10))";;
    lotion_warm) echo "--method lotion --lam 1 --lam-warmup $((STEPS / 2))";;
    *) echo "unknown variant $1" >&2; exit 2;;
  esac
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for block in $BLOCKS; do
  for seed in $SEEDS; do
    for v in $VARIANTS; do
      name="int4-${block}__${v}__s${seed}"
      python examples/train_lm.py $COMMON --format int4 --block-size "$block" --seed "$seed" $(args_for "$v") \
        --out "$DEST/$name.json" > "$DEST/$name.log" 2>&1 &
    done
  done
done
wait
grep -L RESULT "$DEST"/*.log | while read -r f; do echo "FAILED: $f"; tail -5 "$f"; done
python benchmarks/curvature_study.py --lm "$DEST" | tee "${OUT:-results}/curvature_lm.txt"
