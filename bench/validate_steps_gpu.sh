#!/usr/bin/env bash
# Step-level validation on the GPU machine (padded engine), into OUT_DIR:
#   bash bench/validate_steps_gpu.sh OUT_DIR [STAGES]
#   STAGES (default: record eager fit sdpa eager-steps): any of record, eager, fit, sdpa,
#   eager-steps, fidelity, paged, refresh. Each step and fidelity run writes its own JSON, and the log of
#   each model goes to OUT_DIR as it runs, so a stage stopped by its time limit keeps what
#   finished. STEP_SECONDS (default 150) limits each model's validate-steps run; profiling
#   uses TIMER (default do_bench, h100.db's).
#   paged: validate-steps --engine paged (the continuous-batching engine's whole steps) for
#   PAGED_MODELS (default: the models of bench/profile_paged_gpu.sh) with paged|sdpa and the
#   PAGED_EAGER ones with paged|eager, against PAGED_DB (default: DB).
# 1. record the validated models' units (with their token bindings) in h100.db: nothing to
#    measure for sdpa, the profile is complete;
# 2. profile the eager-attention units of EAGER models (every other unit is shared with sdpa);
# 3. fit; 4. validate-steps for each model (sdpa) and each EAGER model (eager).
# refresh: `profile --refresh-host` for every validated model and engine (host times measured
#    again beside a host probe, for a DB profiled before probes were recorded), then fit.
set -u
OUT_DIR=${1:?output folder}
STAGES=" ${2:-record eager fit sdpa eager-steps} "
DB="$OUT_DIR/h100.db"
MODELS="llama-3.2-1b llama-3.2-3b llama-3.1-8b qwen2.5-7b phi-3-mini gemma-2-9b"
EAGER="llama-3.2-1b llama-3.1-8b qwen2.5-7b"
BOUNDS="--max-tokens 4096 --max-seqs 64 --max-context 4096"
BUDGET="--warmup-ms 5 --rep-ms 20 --timer ${TIMER:-do_bench}"
export PYTHONUNBUFFERED=1
has() { [[ "$STAGES" == *" $1 "* ]]; }
if has record; then
    python3 -m dooly_fx profile $MODELS --db "$DB" --device cuda $BOUNDS $BUDGET 2>&1 | tail -3
fi
if has eager; then
    timeout -s INT "${EAGER_SECONDS:-150}" python3 -m dooly_fx profile $EAGER --attn eager \
        --db "$DB" --device cuda $BOUNDS $BUDGET 2>&1 | grep -v "━" | tail -8
fi
if has fit; then
    python3 -m dooly_fx fit --db "$DB" | tail -2
fi
if has refresh; then
    PAGED_ALL="llama-3.2-1b llama-3.1-8b gemma-2-9b qwen2.5-7b llama-3.2-3b mistral-7b phi-3-mini \
qwen1.5-moe-a2.7b"
    for run in "sdpa:$MODELS" "eager:$EAGER" "paged sdpa:$PAGED_ALL" \
            "paged eager:${PAGED_EAGER:-llama-3.2-1b llama-3.1-8b}"; do
        kind=${run%%:*}; models=${run#*:}
        engine="--attn ${kind##* }"; [[ "$kind" == paged* ]] && engine="--engine paged $engine"
        python3 -m dooly_fx profile $models $engine --db "$DB" --device cuda $BOUNDS \
            --timer "${TIMER:-do_bench}" --refresh-host 2>&1 | grep -v "━" | tail -2
    done
    python3 -m dooly_fx fit --db "$DB" | tail -2
fi
LIMIT=${STEP_SECONDS:-150}
if has sdpa; then
    for model in $MODELS; do
        timeout "$LIMIT" python3 -m dooly_fx validate-steps "$model" --db "$DB" --device cuda \
            --json "$OUT_DIR/steps_${model}_sdpa.json" > "$OUT_DIR/log_${model}_sdpa.txt" 2>&1
        echo "$model sdpa: exit $?"; tail -1 "$OUT_DIR/log_${model}_sdpa.txt"
    done
fi
if has eager-steps; then
    for model in $EAGER; do
        timeout "$LIMIT" python3 -m dooly_fx validate-steps "$model" --attn eager --db "$DB" \
            --device cuda --json "$OUT_DIR/steps_${model}_eager.json" \
            > "$OUT_DIR/log_${model}_eager.txt" 2>&1
        echo "$model eager: exit $?"; tail -1 "$OUT_DIR/log_${model}_eager.txt"
    done
fi
if has fidelity; then  # re-predicts the measured steps (no re-timing) and adds unit fidelity
    for model in $MODELS; do
        [ -f "$OUT_DIR/steps_${model}_sdpa.json" ] || continue
        timeout "$LIMIT" python3 -m dooly_fx validate-steps "$model" --db "$DB" --device cuda \
            --measured "$OUT_DIR/steps_${model}_sdpa.json" \
            --fidelity "prefill:4x1024;decode:32x1024" \
            --json "$OUT_DIR/fidelity_${model}_sdpa.json" > "$OUT_DIR/log_${model}_fid.txt" 2>&1
        echo "$model fidelity: exit $?"; tail -1 "$OUT_DIR/log_${model}_fid.txt"
    done
fi
if has paged; then
    PAGED_DB=${PAGED_DB:-$DB}
    for pair in ${PAGED_RUNS:-$(for m in ${PAGED_MODELS:-llama-3.2-1b llama-3.1-8b gemma-2-9b \
            qwen2.5-7b llama-3.2-3b mistral-7b phi-3-mini qwen1.5-moe-a2.7b}; do echo "$m:sdpa";
            done; for m in ${PAGED_EAGER:-llama-3.2-1b llama-3.1-8b}; do echo "$m:eager"; done)}; do
        model=${pair%%:*}; attn=${pair##*:}
        timeout "$LIMIT" python3 -m dooly_fx validate-steps "$model" --engine paged --attn "$attn" \
            --db "$PAGED_DB" --device cuda --json "$OUT_DIR/steps_${model}_paged_${attn}.json" \
            > "$OUT_DIR/log_${model}_paged_${attn}.txt" 2>&1
        echo "$model paged|$attn: exit $?"; tail -2 "$OUT_DIR/log_${model}_paged_${attn}.txt"
    done
fi
