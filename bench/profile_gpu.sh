#!/usr/bin/env bash
# Profile the 12-model zoo subset into one latency DB on the GPU machine (resumable).
#   bash bench/profile_gpu.sh OUTDIR SECONDS
# 1. Llama-2-7B, fp16, prefill GEMM shapes (for the comparison with Vidur's H100 profile).
# 2. The 12 models; stops cleanly (SIGINT) after SECONDS: run it again with the same OUTDIR
#    and DB to finish the rest.
set -u
OUT_DIR=${1:?output folder}
SECONDS_LEFT=${2:-420}
MODELS="llama-3.2-1b llama-3.2-3b llama-3.1-8b llama-3.1-70b mistral-7b mixtral-8x7b
        qwen2.5-7b qwen2.5-14b qwen2.5-72b qwen3-8b gemma-2-9b phi-3-mini"
BOUNDS="--max-tokens 4096 --max-seqs 64 --max-context 4096"
BUDGET="--warmup-ms 5 --rep-ms 20"
export PYTHONUNBUFFERED=1
python3 -m dooly_fx profile llama-2-7b --db "$OUT_DIR/h100_llama2_fp16.db" --device cuda \
    --dtype float16 --phase prefill --max-tokens 4096 --max-seqs 1 --max-context 4096 $BUDGET \
    --json "$OUT_DIR/h100_llama2_fp16.plan.json" 2>&1 | tail -6
timeout -s INT "$SECONDS_LEFT" python3 -m dooly_fx profile $MODELS --db "$OUT_DIR/h100.db" \
    --device cuda $BOUNDS $BUDGET --json "$OUT_DIR/h100.plan.json"
echo "profile exit: $?"
