#!/usr/bin/env bash
# Request-level validation on the GPU machine: serve a trace on transformers continuous
# batching for each MODEL:ATTN and compare with the simulator (one JSON and log per run).
#   bash bench/validate_serving_gpu.sh OUTDIR DB MODEL:ATTN...
# Each run: the first $REQUESTS requests of bench/workloads/splitwise_conv_300.csv, arrivals
# sped up $SPEEDUP times, prompts clipped to $MAX_PROMPT and outputs to $MAX_OUTPUT tokens;
# eager attention gets a smaller cache and token budget (its scores are materialised).
# $SUFFIX is appended to each file name (repeats of one run on one machine); $EXTRA is added
# to every validate-serving command (e.g. EXTRA="--gc off").
set -u
OUT_DIR=${1:?output folder}
DB=${2:?latency DB}
shift 2
REQUESTS=${REQUESTS:-150}
SPEEDUP=${SPEEDUP:-1.5}
MAX_PROMPT=${MAX_PROMPT:-2048}
MAX_OUTPUT=${MAX_OUTPUT:-256}
RUN_SECONDS=${RUN_SECONDS:-240}
SUFFIX=${SUFFIX:-}
EXTRA=${EXTRA:-}
TRACE=bench/workloads/splitwise_conv_300.csv
mkdir -p "$OUT_DIR/serving"
export PYTHONUNBUFFERED=1
for item in "$@"; do
    model=${item%%:*}
    attn=${item##*:}
    extra=""
    if [ "$attn" = eager ]; then
        extra="--max-batch-tokens 1024 --num-blocks 128"
    fi
    name="$OUT_DIR/serving/serving_${model}_${attn}${SUFFIX}"
    echo "=== $model $attn"
    timeout -s INT "$RUN_SECONDS" python3 -m dooly_fx validate-serving "$model" --db "$DB" \
        --attn "$attn" --trace "$TRACE" --num-requests "$REQUESTS" --speedup "$SPEEDUP" \
        --max-prompt "$MAX_PROMPT" --max-output "$MAX_OUTPUT" --time-limit 120 $extra $EXTRA \
        --json "$name.json" > "$name.log" 2>&1
    echo "exit $?"
    grep -v "ContinuousBatchingLogger\|^\s*$" "$name.log" | tail -12
done
