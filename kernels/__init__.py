"""Fused Triton kernels for op units (profiled as a fused-engine variant).

Each module holds a `@triton.jit` kernel, a launcher taking torch tensors, a torch reference
written as transformers computes it, and `*_flops` / `*_bytes` cost formulas:

module      launcher                                          reference
----------  ------------------------------------------------  -------------------
rmsnorm     rmsnorm(x (T,H), weight (H,), eps, offset=0.0)    rmsnorm_ref
silu_mul    silu_mul(gate_up (T,2I)) -> (T,I)                 silu_mul_ref
silu_mul    silu_mul_split(gate (T,I), up (T,I)) -> (T,I)     silu_mul_split_ref
rotary      rotary(q (T,Hq,D), k (T,Hk,D), cos (T,D), sin)    rotary_ref
              -> (q_out, k_out)

This package imports nothing itself: triton is a dev dependency, so import the kernel modules
(`from dooly_fx.kernels.rmsnorm import rmsnorm`) only where triton is installed. To run them on
CPU under Triton's interpreter, set `TRITON_INTERPRET=1` before triton is first imported.
"""
