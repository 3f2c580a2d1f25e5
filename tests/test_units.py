"""Extracted unit subgraphs run standalone; the opaque capture ops compute the right thing."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dooly_fx import moe, paged
from dooly_fx.capture import capture
from dooly_fx.engine import EngineProfile
from dooly_fx.passes.partition import partition, unit_inputs, unit_subgraph
from dooly_fx.passes.signature import signature
from dooly_fx.passes.taint import taint
from dooly_fx.symbols import named

from tiny import tiny_spec


def _units(phase: str = "prefill"):
    (cap,) = capture(tiny_spec("llama-3.1-8b", layers=1), EngineProfile(dtype="float32"), phase)
    taint(cap.gm, cap.symbols)
    return cap, partition(cap.gm)


def _real(node, sizes: dict[str, int]) -> torch.Tensor:
    """A random real tensor shaped like `node`'s fake value, request symbols set by `sizes`."""
    from dooly_fx.passes.taint import META_KEY, Config

    (label,) = node.meta[META_KEY]
    subs = {named(k): v for k, v in sizes.items()}
    shape = [d.value if isinstance(d, Config) else int(d.expr.subs(subs)) for d in label.dims]
    return torch.randn(shape, dtype=label.dtype)


def test_norm_subgraph_matches_rmsnorm():
    cap, units = _units()
    norm = next(u for u in units if u.kind == "norm" and "input_layernorm" in u.module)
    gm = unit_subgraph(cap.gm, norm)
    x, weight = (_real(n, {"B": 2, "S": 5}) for n in unit_inputs(norm))
    eps = tiny_spec("llama-3.1-8b").config.rms_norm_eps
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    torch.testing.assert_close(gm(x, weight), expected)


def test_gemm_subgraph_is_a_linear():
    cap, units = _units()
    down = next(u for u in units if u.module.endswith("mlp.down_proj"))
    gm = unit_subgraph(cap.gm, down)
    x, weight = (_real(n, {"B": 3, "S": 4}) for n in unit_inputs(down))
    assert tuple(weight.shape) == (64, 128)
    torch.testing.assert_close(gm(x, weight), x @ weight.T)
    assert signature(down).data["inputs"] == [["float32", ["m", 128]], ["float32", [64, 128]]]


def test_paged_attention_reference_is_per_sequence_causal():
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    out = paged.paged_attention(q, k, v, cu, paged.kv_cache_write(k, v, cu), 0, 0.0, 0, "sdpa")
    start = 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
        scores = (qs @ ks.transpose(1, 2)) / 4.0
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out[start:start + n], (scores.softmax(-1) @ vs).transpose(0, 1))
        start += n


def test_moe_experts_reference_matches_dense_loop():
    torch.manual_seed(0)
    tokens, hidden, inter, experts = 5, 8, 6, 4
    x = torch.randn(tokens, hidden)
    index = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 3], [1, 0]])
    weights = torch.rand(tokens, 2)
    up, down = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    out = moe.moe_experts(x, index, weights, up, down, True, False, "grouped_mm")
    for t in range(tokens):
        expected = torch.zeros(hidden)
        for slot in range(2):
            e = int(index[t, slot])
            gate, val = (x[t] @ up[e].T).chunk(2)
            expected += weights[t, slot] * (down[e] @ (torch.nn.functional.silu(gate) * val))
        torch.testing.assert_close(out[t], expected, rtol=1e-4, atol=1e-4)


def test_moe_lowering_routes_tokens_uniformly(monkeypatch):
    from dooly_fx import lowering
    from dooly_fx.profile import collect

    coll = collect([tiny_spec("mixtral-8x7b", layers=1)], EngineProfile(dtype="float32"),
                   ["prefill"])
    case = next(c for c in coll.cases.values() if c.kind == "moe_experts")
    seen = {}
    original = lowering.replay_subgraph

    def spy(case, point, device, args=None, gm=None):
        seen["args"] = args
        return original(case, point, device, args, gm)

    monkeypatch.setattr(lowering, "replay_subgraph", spy)
    lowering.lower(case, {"m": 8}, "cpu").check()
    index = next(a for a in seen["args"] if isinstance(a, torch.Tensor)
                 and a.dtype == torch.int64)
    weights = next(a for a in seen["args"] if isinstance(a, torch.Tensor)
                   and a.shape == index.shape and a.is_floating_point())
    assert torch.bincount(index.flatten(), minlength=4).tolist() == [4, 4, 4, 4]  # 8 tokens x 2
    assert torch.all(weights == 0.5)


def test_inlined_eager_attention_is_attention():
    """Regression: a traced stack that names no attention helper still has matmul-softmax-
    matmul; it is attention (and swept over its own request variables), not elementwise."""
    from dooly_fx.passes.partition import _classify

    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
        return torch.matmul(scores, v)

    gm = make_fx(eager)(*[torch.randn(1, 2, 4, 8)] * 3)
    compute = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert _classify(compute, "model.layers.0.self_attn", "LlamaAttention", "forward") == \
        "attention"
    assert _classify(compute[:1], "model.layers.0.mlp", "LlamaMLP", "forward") == "elementwise"


def test_engine_prepare_schedules_the_batch_and_builds_its_masks():
    """The engine's per-step preparation runs transformers' FIFO scheduler over the batch's
    requests (decodes and a chunked prefill), then its batch tensors: every sequence is
    scheduled, read indices cover cached + new tokens, and paged|sdpa gets a block-diagonal
    causal mask; the same step can be prepared again (the microbenchmark repeats it)."""
    from transformers import LlamaConfig

    canonical = paged.engine_prepare_canonical(LlamaConfig(), "float32", "sdpa")
    assert canonical["ops"][0] == "FIFOScheduler.schedule_batch"
    fn = paged.engine_prepare(canonical, "cpu", [1, 4, 1], [40, 300, 0])
    for _ in range(2):
        kwargs = fn()
        assert kwargs["cu_seq_lens_q"].tolist() == [0, 1, 5, 6]
        assert kwargs["position_ids"].tolist() == [[40, *range(300, 304), 0]]
        assert [len(r) for r in kwargs["read_index"]] == [41 + 304 + 1]
        mask = kwargs["attention_mask"]
        assert list(mask.shape) == [1, 1, 6, 346]
        visible = (mask[0, 0] == 0).sum(-1).tolist()
        assert visible == [41, 301, 302, 303, 304, 1]
    eager = paged.engine_prepare_canonical(LlamaConfig(), "float32", "eager")
    assert eager["scalars"][0][-1] == "paged|eager" and eager != canonical


def test_engine_batch_step_runs_the_engines_forward_and_sampling():
    """`EngineBatch.step` is a whole continuous-batching step on a real model: prefills of
    different lengths flattened into one forward over the paged cache, greedy sampling of one
    token per sequence, identical to the padded forward's argmax of each sequence's last
    logits; and it can run again (validate-steps repeats it)."""
    from dooly_fx.engine import EngineProfile
    from dooly_fx.validate import build_model

    from tiny import tiny_spec

    torch.manual_seed(0)
    model = build_model(tiny_spec("llama-3.1-8b"), EngineProfile(dtype="float32"), "cpu")
    prompts = [torch.randint(0, 256, (q,)).tolist() for q in (5, 3, 9)]
    with torch.inference_mode():
        want = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
        assert len(set(want)) == 3
        model.set_attn_implementation("paged|sdpa")
        batch = paged.EngineBatch(model.config, torch.float32, "cpu", [5, 3, 9], [0, 0, 0],
                                  block_size=16, tokens=prompts)
        for _ in range(2):
            batch.step(model)
            assert batch.io.output_ids[0, :3].tolist() == want


def test_forward_host_times_the_engines_whole_forward_in_its_grad_mode():
    """A paged model's `forward_host` unit is one per step of each phase; its signature is
    the whole config plus the engine (another attention backend is another signature), swept
    over N in (1, 2, 4, 8) within the bounds; its runnable is the engine's forward
    (`ModelRunner.compute_batch`: forward, logits, sampling) over N decodes, in the engine's
    autograd mode, repeatable, its model kept until `release_models`."""
    from dooly_fx.lowering import lower
    from dooly_fx.passes.signature import signature_of
    from dooly_fx.profile import collect
    from dooly_fx.sweep import Bounds, points

    spec = tiny_spec("llama-3.1-8b")
    engine = EngineProfile(engine="paged", dtype="float32")
    coll = collect([spec], engine, ["prefill", "decode"])
    (case,) = [c for c in coll.cases.values() if c.kind == "forward_host"]
    assert sorted(u[:2] + u[4:] for u in coll.units[spec.name] if u[3] == case.key) == [
        ("decode", "", 1, {}), ("prefill", "", 1, {})]
    assert case.canonical["config"]["num_hidden_layers"] == 3
    assert case.canonical["scalars"] == [["paged|sdpa|float32"]]
    eager = paged.forward_host_canonical(spec.config, EngineProfile(
        engine="paged", attn_impl="eager", dtype="float32"))
    assert signature_of(eager).key != case.key
    assert signature_of(paged.forward_host_canonical(spec.config, engine)).key == case.key
    assert points(case.canonical, Bounds()) == [{"N": n} for n in (1, 2, 4, 8)]
    assert points(case.canonical, Bounds(max_seqs=2)) == [{"N": 1}, {"N": 2}]

    runnable = lower(case, {"N": 3}, "cpu")
    assert not runnable.graphs and runnable.host_calls == 60  # only its host issue is used
    (model,) = paged._FORWARD_MODELS.values()
    modes = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: modes.append(
        (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
         kwargs["input_ids"].shape[-1])), with_kwargs=True)
    runnable.check()
    runnable.fn()
    assert modes == [(False, False, 3)] * 2
    assert lower(case, {"N": 1}, "cpu") and list(paged._FORWARD_MODELS.values()) == [model]
    paged.release_models()
    assert not paged._FORWARD_MODELS


def test_engine_attention_runs_the_sliding_window_path():
    """A sliding-window layer reads at most window - 1 cached tokens of each sequence from the
    engine's rolling buffer before writing the new ones (masked_scatter_ puts them in), and
    its output matches plain attention over exactly those keys; a full layer reads them all."""
    torch.manual_seed(0)
    new, cached = [1, 3, 1], [20, 4, 0]
    for window in (8, 0):
        fn, reference = paged.engine_attention(4, 2, 16, torch.float32, "cpu", "sdpa", new,
                                               cached, block_size=16, window=window)
        got = fn()
        torch.testing.assert_close(got, reference(), rtol=1e-4, atol=1e-4)


def test_paged_attention_point_in_a_key_class_reads_that_many_keys(monkeypatch):
    """A point with `A` gives the first sequence a few more cached tokens, so the keys read
    (N·P + T = 68 at this point, class 2) fall in that class; the runnable still checks
    against plain attention."""
    from dooly_fx import lowering
    from dooly_fx.costs import key_class
    from dooly_fx.profile import collect

    coll = collect([tiny_spec("llama-3.1-8b", layers=1)],
                   EngineProfile(engine="paged", attn_impl="eager", dtype="float32"), ["decode"])
    case = next(c for c in coll.cases.values() if c.kind == "paged_attention")
    seen = []
    original = paged.engine_attention

    def spy(*args, **kwargs):
        seen.append((list(args[6]), list(args[7])))  # new, cached per sequence
        return original(*args, **kwargs)

    monkeypatch.setattr(paged, "engine_attention", spy)
    for cls, cached in ((8, [20, 16, 16, 16]), (2, [16, 16, 16, 16]), (1, [17, 16, 16, 16])):
        lowering.lower(case, {"N": 4, "P": 16, "A": cls}, "cpu").check()
        new, got = seen[-1]
        assert got == cached and key_class(sum(new) + sum(got)) == cls
