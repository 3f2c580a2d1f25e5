#!/usr/bin/env bash
# Profile the padded engine into OUTDIR/h100.db on the GPU machine (resumable):
#   bash bench/profile_gpu.sh OUTDIR SECONDS
#   TIMER=stream bash bench/profile_gpu.sh OUTDIR SECONDS     # another timer (docs/sweeps.md)
#   LLAMA2=1 bash bench/profile_gpu.sh OUTDIR SECONDS          # also step 1
# 1. (LLAMA2=1) Llama-2-7B, fp16, prefill GEMM shapes, into OUTDIR/h100_llama2_fp16.db (for the
#    comparison with Vidur's H100 profile).
# 2. The 12-model zoo subset with sdpa; then three of them with eager attention, and with the
#    fused kernels (`--kernels triton`: norms, SiLU·mul and rotary as our Triton kernels).
# Stops cleanly (SIGINT) after SECONDS in all; run it again on the same DB to finish the rest.
# The timer is TIMER, by default h100.db's (do_bench); a DB keeps each timer's samples apart.
set -u
OUT_DIR=${1:?output folder}
DEADLINE=$(( $(date +%s) + ${2:-420} ))
TIMER=${TIMER:-do_bench}
MODELS="llama-3.2-1b llama-3.2-3b llama-3.1-8b llama-3.1-70b mistral-7b mixtral-8x7b
        qwen2.5-7b qwen2.5-14b qwen2.5-72b qwen3-8b gemma-2-9b phi-3-mini"
THREE="llama-3.2-1b llama-3.1-8b qwen2.5-7b"
BOUNDS="--max-tokens 4096 --max-seqs 64 --max-context 4096"
BUDGET="--warmup-ms 5 --rep-ms 20"
export PYTHONUNBUFFERED=1
if [ "${LLAMA2:-0}" = 1 ]; then
    python3 -m dooly_fx profile llama-2-7b --db "$OUT_DIR/h100_llama2_fp16.db" --device cuda \
        --dtype float16 --phase prefill --max-tokens 4096 --max-seqs 1 --max-context 4096 \
        --timer "$TIMER" $BUDGET --json "$OUT_DIR/h100_llama2_fp16.plan.json" 2>&1 | tail -6
fi
for variant in "$MODELS|--attn sdpa" "$THREE|--attn eager" "$THREE|--kernels triton"; do
    models=${variant%%|*}
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 10 ]; then echo "out of time before ${variant#*|}"; exit 0; fi
    timeout -s INT "$left" python3 -m dooly_fx profile $models ${variant#*|} \
        --db "$OUT_DIR/h100.db" --device cuda --timer "$TIMER" $BOUNDS $BUDGET
    echo "profile ${variant#*|} exit: $?"
done
