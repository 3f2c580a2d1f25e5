#!/usr/bin/env bash
# Profile the 12-model zoo subset into one latency DB on the GPU machine (resumable).
#   bash bench/profile_gpu.sh DB SECONDS
# Stops cleanly (SIGINT) after SECONDS; run it again with the same DB to finish the rest.
set -u
DB=${1:?db path}
SECONDS_LEFT=${2:-480}
MODELS="llama-3.2-1b llama-3.2-3b llama-3.1-8b llama-3.1-70b mistral-7b mixtral-8x7b
        qwen2.5-7b qwen2.5-14b qwen2.5-72b qwen3-8b gemma-2-9b phi-3-mini"
BOUNDS="--max-tokens 4096 --max-seqs 64 --max-context 4096"
BUDGET="--warmup-ms 5 --rep-ms 20"
export PYTHONUNBUFFERED=1
timeout -s INT "$SECONDS_LEFT" python3 -m dooly_fx profile $MODELS --db "$DB" --device cuda \
    $BOUNDS $BUDGET
echo "profile exit: $?"
python3 -m dooly_fx plan $MODELS --db "$DB" --device cuda $BOUNDS --json "${DB%.db}.plan.json" \
    | tail -3
