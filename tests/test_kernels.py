"""Fused Triton kernels against their transformers-order torch references, on CPU.

The kernels run under Triton's interpreter: `TRITON_INTERPRET=1` must be in the environment
before a kernel module is imported (triton reads it when `@triton.jit` decorates), which is
why it is set here before any triton import and, for whole-suite runs where another module may
import triton first, in tests/conftest.py too.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dooly_fx.kernels.rmsnorm import (  # noqa: E402
    rmsnorm,
    rmsnorm_bytes,
    rmsnorm_flops,
    rmsnorm_ref,
)
from dooly_fx.kernels.rotary import (  # noqa: E402
    rotary,
    rotary_bytes,
    rotary_flops,
    rotary_ref,
)
from dooly_fx.kernels.silu_mul import (  # noqa: E402
    silu_mul,
    silu_mul_bytes,
    silu_mul_flops,
    silu_mul_ref,
    silu_mul_split,
    silu_mul_split_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel math is fp32 with one final rounding; the references round after every op in low
# precision, so they may differ by a couple of ulps of the output dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- rmsnorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "h"), [(3, 64), (5, 96), (7, 200), (1, 1)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_matches_reference(t, h, dtype, offset):
    g = _gen(t * h)
    x = (torch.randn(t, h, generator=g) * 3).to(dtype)  # (T, H)
    w = (torch.randn(h, generator=g) * 0.5 + (0.0 if offset else 1.0)).to(dtype)  # (H,)
    out = rmsnorm(x, w, 1e-6, offset)
    _close(out, rmsnorm_ref(x, w, 1e-6, offset))
    # The kernel rounds once, from fp32: it matches fp32 math cast to dtype in every dtype.
    xf = x.float()
    exact = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w.float())
    _close(out, exact.to(dtype))


def test_rmsnorm_gemma_offset_changes_result_and_eps_is_used():
    x = torch.randn(4, 96, generator=_gen(0))
    w = torch.randn(96, generator=_gen(1)) * 0.1
    llama, gemma = rmsnorm(x, w, 1e-6), rmsnorm(x, w, 1e-6, offset=1.0)
    assert (llama - gemma).abs().max() > 0.5
    torch.testing.assert_close(gemma, rmsnorm(x, 1.0 + w, 1e-6), atol=1e-5, rtol=1e-5)
    # A large eps must damp the scale: rsqrt(mean(x^2) + 100) on unit-variance rows.
    damped = rmsnorm(x, torch.ones(96), 100.0)
    torch.testing.assert_close(damped, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 100.0),
                               atol=1e-6, rtol=1e-5)


def test_rmsnorm_strided_rows():
    base = torch.randn(5, 160, generator=_gen(2))
    x = base[:, 16:112]  # (5, 96), row stride 160
    w = torch.rand(96, generator=_gen(3))
    _close(rmsnorm(x, w, 1e-5), rmsnorm_ref(x.contiguous(), w, 1e-5))


def test_rmsnorm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.zeros(2, 8), torch.ones(7), 1e-6)


def test_rmsnorm_costs():
    t, h = 7, 96
    assert rmsnorm_flops(t, h) == 4 * 7 * 96 + 3 * 7 == 2709
    assert rmsnorm_bytes(t, h, 2) == (7 * 96 + 7 * 96 + 96) * 2 == 2880


# --- silu_mul ----------------------------------------------------------------------------------


def _silu_fp32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "i"), [(3, 64), (5, 80), (4, 1500), (1, 1)])
def test_silu_mul_fused_layout(t, i, dtype):
    gate_up = (torch.randn(t, 2 * i, generator=_gen(t + i)) * 4).to(dtype)  # (T, 2I)
    out = silu_mul(gate_up)
    assert out.shape == (t, i)
    _close(out, silu_mul_ref(gate_up))
    _close(out, _silu_fp32(gate_up[:, :i], gate_up[:, i:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "i"), [(3, 64), (6, 80), (2, 1100)])
def test_silu_mul_split_layout(t, i, dtype):
    g = _gen(7 * t + i)
    gate = (torch.randn(t, i, generator=g) * 4).to(dtype)  # (T, I)
    up = torch.randn(t, i, generator=g).to(dtype)  # (T, I)
    out = silu_mul_split(gate, up)
    _close(out, silu_mul_split_ref(gate, up))
    _close(out, _silu_fp32(gate, up))


def test_silu_mul_gate_is_first_half_and_views_work():
    gate_up = torch.randn(5, 160, generator=_gen(4))
    gate, up = gate_up[:, :80], gate_up[:, 80:]
    assert not torch.allclose(silu_mul(gate_up), silu_mul_split(up, gate), atol=1e-3)
    # Column views with a row stride of 160 (as a fused projection's output would be sliced).
    _close(silu_mul_split(gate, up), silu_mul(gate_up))
    _close(silu_mul_split(gate, up.contiguous()), silu_mul(gate_up))  # row strides 160 and 80
    _close(silu_mul(torch.cat([gate_up, gate_up], 1)[:, :160]), silu_mul_ref(gate_up))


def test_silu_mul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2I"):
        silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="one dtype"):
        silu_mul_split(torch.zeros(2, 8), torch.zeros(2, 9))


def test_silu_mul_costs():
    t, i = 5, 80
    assert silu_mul_flops(t, i) == 5 * 5 * 80 == 2000
    assert silu_mul_bytes(t, i, 2) == (2 * 5 * 80 + 5 * 80) * 2 == 2400


# --- rotary ------------------------------------------------------------------------------------


def _cos_sin(positions: torch.Tensor, d: int, dtype: torch.dtype, base: float = 10000.0):
    """cos, sin (T, D) as transformers' default rotary embedding builds them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotary_fp32(x, cos, sin):
    xf, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), -1)
    return (xf * c + rot * s).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "hq", "hk", "d"), [
    (3, 4, 2, 128),  # GQA
    (5, 4, 2, 96),  # non-power-of-2 head dim
    (4, 2, 2, 64),  # MHA
    (3, 3, 1, 256),  # MQA, largest head dim
    (2, 12, 4, 128),  # two q head blocks per token, the second partly masked
    (3, 1, 8, 80),  # more k heads than q heads
    (2, 1, 1, 2),
])
def test_rotary_matches_reference(t, hq, hk, d, dtype):
    g = _gen(t * d + hq)
    q = torch.randn(t, hq, d, generator=g).to(dtype)  # (T, Hq, D)
    k = torch.randn(t, hk, d, generator=g).to(dtype)  # (T, Hk, D)
    cos, sin = _cos_sin(torch.tensor([0, 7, 31, 1000, 4095][:t]), d, dtype)
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_ref(q, k, cos, sin)
    _close(q_out, q_ref)
    _close(k_out, k_ref)
    _close(q_out, _rotary_fp32(q, cos, sin))
    _close(k_out, _rotary_fp32(k, cos, sin))


def test_rotary_uses_both_halves_of_cos_sin_and_strided_qk():
    # Random cos/sin whose halves differ catch a kernel that reuses one half for both.
    t, hq, hk, d = 5, 4, 2, 96
    g = _gen(5)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)  # fused qkv projection output
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_ref(q, k, cos, sin)
    _close(q_out, q_ref)
    _close(k_out, k_ref)
    assert (q_out - q).abs().max() > 0.5
    # q and k with different token and head strides: q head-major, k with padded heads.
    q = torch.randn(hq, t, d, generator=g).transpose(0, 1)  # (T, Hq, D), strides (D, T*D, 1)
    k = torch.randn(t, hk, d + 32, generator=g)[..., :d]  # (T, Hk, D), strides (.., D+32, 1)
    for out, ref in zip(rotary(q, k, cos, sin), rotary_ref(q, k, cos, sin), strict=True):
        _close(out, ref)


def test_rotary_position_zero_is_identity():
    q, k = torch.randn(1, 4, 128, generator=_gen(6)), torch.randn(1, 2, 128, generator=_gen(7))
    cos, sin = _cos_sin(torch.tensor([0]), 128, torch.float32)
    q_out, k_out = rotary(q, k, cos, sin)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_rotary_rejects_bad_shapes():
    cos = sin = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="Hk"):
        rotary(torch.zeros(2, 1, 8), torch.zeros(3, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rotary(torch.zeros(2, 1, 7), torch.zeros(2, 1, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cos"):
        rotary(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), cos[:1], sin)


def test_rotary_costs():
    t, hq, hk, d = 5, 4, 2, 96
    assert rotary_flops(t, hq, hk, d) == 3 * 5 * 6 * 96 == 8640
    # q, k read + written; cos, sin read once per token.
    assert rotary_bytes(t, hq, hk, d, 2) == (2 * 5 * 6 * 96 + 2 * 5 * 96) * 2 == 13440


# --- the fused engine as a model ---------------------------------------------------------------


@pytest.mark.parametrize("name, fused", [
    ("llama-3.1-8b", {"norm": 7, "act_mul": 3, "rotary": 3}),
    ("phi-3-mini", {"norm": 7, "act_mul": 3, "rotary": 3}),
    ("gemma-2-9b", {"norm": 21, "act_mul": 0, "rotary": 5})])
def test_fuse_model_runs_the_kernels_and_keeps_the_models_output(name, fused, monkeypatch):
    """`fuse_model` swaps every RMSNorm (Gemma's `1 + w` scale too), every SiLU-gated MLP
    (split gate/up and Phi-3's packed gate_up) and every attention's rotary embedding for our
    kernels; GELU MLPs stay as they are, and so does an unfused model of the same class.
    Same weights, same logits."""
    import dooly_fx.fused
    from dooly_fx.engine import EngineProfile
    from dooly_fx.fused import fuse_model
    from dooly_fx.validate import build_model

    from tiny import tiny_spec

    calls = []
    rotary_of = dooly_fx.fused.fused_rotary
    monkeypatch.setattr(dooly_fx.fused, "fused_rotary",
                        lambda *args: calls.append(1) or rotary_of(*args))

    spec = tiny_spec(name)
    eager = build_model(spec, EngineProfile(dtype="float32"), "cpu")
    for module in eager.modules():  # non-trivial norm scales, so a dropped weight shows
        if type(module).__name__.endswith("RMSNorm"):
            torch.nn.init.normal_(module.weight, 1.0, 0.1, generator=_gen(1))
    model = build_model(spec, EngineProfile(dtype="float32"), "cpu")
    model.load_state_dict(eager.state_dict())
    assert fuse_model(model) == fused
    ids = torch.randint(0, 100, (2, 5), generator=_gen(2))
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        assert len(calls) == fused["rotary"]  # one launch per layer
        want = eager(input_ids=ids).logits
    assert len(calls) == fused["rotary"]  # the unfused model ran transformers' rotary
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Only the kinds a profile fused (`profiled_kinds`): here the norms alone.
    alone = build_model(spec, EngineProfile(dtype="float32"), "cpu")
    assert fuse_model(alone, {"norm"}) == {"norm": fused["norm"], "act_mul": 0, "rotary": 0}
