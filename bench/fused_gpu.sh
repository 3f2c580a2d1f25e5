#!/usr/bin/env bash
# The fused engine (`--kernels triton`) on the GPU machine, into OUT_DIR (holding h100.db):
#   bash bench/fused_gpu.sh OUT_DIR [STAGES]
#   STAGES (default: profile steps): profile (and fit) the fused units, run the steps.
# 1. profile the fused units (RMSNorm, SiLU·mul as our Triton kernels) of MODELS; every other
#    unit is shared with the eager engine and already in the DB; 2. fit;
# 3. for each model, validate-steps of the eager engine and of the fused engine (the model's
#    norms and MLPs running our kernels, `fused.fuse_model`) on this machine, one after the
#    other, so that their measured speed-up and the predicted one can be compared.
set -u
OUT_DIR=${1:?output folder}
DB="$OUT_DIR/h100.db"
MODELS=${MODELS:-"llama-3.2-1b llama-3.1-8b qwen2.5-7b"}
BOUNDS="--max-tokens 4096 --max-seqs 64 --max-context 4096"
STAGES=" ${2:-profile steps} "
export PYTHONUNBUFFERED=1
if [[ "$STAGES" == *" profile "* ]]; then
    python3 -m dooly_fx profile $MODELS --kernels triton --db "$DB" --device cuda $BOUNDS \
        --warmup-ms 5 --rep-ms 20 --timer "${TIMER:-do_bench}" 2>&1 | grep -v "━" | tail -6
    python3 -m dooly_fx fit --db "$DB" | tail -2
fi
[[ "$STAGES" == *" steps "* ]] || exit 0
for model in $MODELS; do
    for kernels in eager triton; do
        timeout "${STEP_SECONDS:-120}" python3 -m dooly_fx validate-steps "$model" \
            --kernels "$kernels" --db "$DB" --device cuda \
            --json "$OUT_DIR/steps_${model}_${kernels}.json" > "$OUT_DIR/log_${model}_${kernels}.txt" 2>&1
        echo "$model $kernels: exit $?"; tail -1 "$OUT_DIR/log_${model}_${kernels}.txt"
    done
done
