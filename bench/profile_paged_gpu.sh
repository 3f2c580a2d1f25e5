#!/usr/bin/env bash
# Profile the paged engine (transformers continuous batching) into OUTDIR/h100.db on the GPU
# machine, resumable: every unit of each model as the engine runs it, its attention swept over
# (T, N, P), the per-shape attention setup and the engine's per-step preparation (scheduler and
# batch tensors) included.
#   bash bench/profile_paged_gpu.sh OUTDIR SECONDS
#   DB=stream.db bash bench/profile_paged_gpu.sh OUTDIR SECONDS    # into OUTDIR/stream.db
#   TIMER=do_bench bash bench/profile_paged_gpu.sh OUTDIR SECONDS  # the timer of h100.db
# Stops cleanly (SIGINT) after SECONDS in all; run it again on the same DB to finish the rest.
# The timer is TIMER, by default profile's (stream, with each unit also timed under sustained
# load); a DB keeps each timer's samples apart, so profiling into h100.db takes do_bench.
set -u
OUT_DIR=${1:?output folder}
DEADLINE=$(( $(date +%s) + ${2:-480} ))
DB=${DB:-h100.db}
TIMER=${TIMER:-stream}
SDPA="llama-3.2-1b llama-3.1-8b gemma-2-9b qwen2.5-7b llama-3.2-3b mistral-7b phi-3-mini
      qwen1.5-moe-a2.7b"
EAGER="llama-3.2-1b llama-3.1-8b"
BOUNDS="--max-tokens 8192 --max-seqs 128 --max-context 4096"
BUDGET="--warmup-ms 5 --rep-ms 20"
export PYTHONUNBUFFERED=1
for attn in sdpa eager; do
    models=$SDPA
    [ "$attn" = eager ] && models=$EAGER
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 10 ]; then echo "out of time before $attn"; exit 0; fi
    timeout -s INT "$left" python3 -m dooly_fx profile $models --engine paged --attn "$attn" \
        --db "$OUT_DIR/$DB" --device cuda --timer "$TIMER" $BOUNDS $BUDGET
    echo "profile paged $attn exit: $?"
done
