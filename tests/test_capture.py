"""Capture + taint + partition + signature on real (tiny) transformers models."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from dooly_fx.capture import capture, layer_plan
from dooly_fx.engine import EngineProfile
from dooly_fx.passes.partition import partition
from dooly_fx.passes.signature import signature
from dooly_fx.passes.taint import META_KEY, Config, Request, taint
from dooly_fx.report import analyze_graph, analyze_model
from dooly_fx.symbols import named

from tiny import FAMILIES, tiny_spec

PADDED = EngineProfile()
PAGED = EngineProfile(engine="paged")


def _linear(gm, module_suffix: str):
    """The `aten.linear` node issued by the module whose path ends with `module_suffix`."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.target is torch.ops.aten.linear.default and stack and \
                list(stack.values())[-1][0].endswith(module_suffix):
            return node
    raise AssertionError(f"no linear in {module_suffix}")


def _labels(node):
    return node.meta[META_KEY][0].dims


def _counts(report, phase: str, regime: str = "") -> Counter:
    (ph,) = [p for p in report.phases if p.phase == phase and p.regime == regime]
    counts: Counter = Counter()
    for row in ph.graph.units:
        counts[row.signature.key] += row.count
    return counts


@pytest.fixture(scope="module")
def llama_prefill():
    (cap,) = capture(tiny_spec("llama-3.1-8b"), PADDED, "prefill")
    summary = taint(cap.gm, cap.symbols)
    return cap, summary


def test_projection_labels_are_exact_with_provenance(llama_prefill):
    cap, summary = llama_prefill
    b, s = Request(named("B")), Request(named("S"))
    assert _labels(_linear(cap.gm, "self_attn.q_proj")) == (
        b, s, Config(64, "head_dim*num_attention_heads"))
    assert _labels(_linear(cap.gm, "self_attn.k_proj")) == (
        b, s, Config(32, "head_dim*num_key_value_heads"))
    assert _labels(_linear(cap.gm, "mlp.gate_proj")) == (b, s, Config(128, "intermediate_size"))
    assert _labels(_linear(cap.gm, "mlp.down_proj")) == (b, s, Config(64, "hidden_size"))
    assert summary.unlabelled == []
    assert summary.unattributed == 0
    assert summary.mixed == 0


def test_weights_carry_config_fields(llama_prefill):
    cap, _ = llama_prefill
    weight = _linear(cap.gm, "self_attn.v_proj").args[1]
    assert _labels(weight) == (Config(32, "head_dim*num_key_value_heads"),
                               Config(64, "hidden_size"))


def test_equal_config_values_and_batch_do_not_collide():
    # Every head-related field is 8, and the kv-head count equals the batch example size
    # used while tracing: labels must still come from structure, not values.
    spec = tiny_spec("llama-3.1-8b", hidden_size=64, num_attention_heads=8,
                     num_key_value_heads=8, head_dim=8, intermediate_size=8)
    (cap,) = capture(spec, PADDED, "prefill")
    taint(cap.gm, cap.symbols)
    b, s = Request(named("B")), Request(named("S"))
    assert _labels(_linear(cap.gm, "k_proj")) == (b, s, Config(64, "head_dim*num_key_value_heads"))
    assert _labels(_linear(cap.gm, "q_proj")) == (b, s, Config(64, "head_dim*num_attention_heads"))
    assert _labels(_linear(cap.gm, "gate_proj")) == (b, s, Config(8, "intermediate_size"))
    sdpa = next(n for n in cap.gm.graph.nodes
                if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert _labels(sdpa) == (b, Config(8, "num_attention_heads"), s, Config(8, "head_dim"))

    # num_key_value_heads == 3 == the example batch size B.
    spec = tiny_spec("llama-3.1-8b", hidden_size=96, num_attention_heads=6,
                     num_key_value_heads=3)
    (cap,) = capture(spec, PADDED, "decode")
    taint(cap.gm, cap.symbols)
    k_cache = next(n for n in cap.gm.graph.nodes if n.op == "placeholder"
                   and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4)
    assert _labels(k_cache) == (b, Config(3, "num_key_value_heads"), Request(named("P")),
                                Config(16, "head_dim"))


def test_decode_attention_depends_on_cached_length():
    report = analyze_model(tiny_spec("llama-3.1-8b"), PADDED, ["decode"])
    rows = {r.kind: r for r in report.phases[0].graph.units}
    assert rows["attention"].request_dims == ["B", "P + 1"]
    assert set(rows["kv_cache_update"].request_dims) == {"B", "P", "P + 1"}
    assert rows["gemm"].request_dims == ["B"]  # one new token per sequence
    assert rows["attention"].count == 3


def test_llama_prefill_units_and_counts():
    report = analyze_model(tiny_spec("llama-3.1-8b", layers=4), PADDED, ["prefill"])
    kinds = Counter()
    for row in report.phases[0].graph.units:
        kinds[row.kind] += row.count
    assert kinds == Counter({
        "gemm": 7 * 4, "norm": 2 * 4 + 1, "residual": 2 * 4, "rotary": 4, "attention": 4,
        "kv_cache_update": 4, "act_mul": 4, "embedding": 1, "lm_head": 1, "rotary_cache": 1,
        "positions": 1})
    assert report.summary()["built_layers"] == 1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_period_capture_counts_equal_full_depth(name):
    spec = tiny_spec(name)
    period = analyze_model(spec, PADDED, ["prefill", "decode"])
    full = analyze_model(spec, PADDED, ["prefill", "decode"], full_depth=True)
    assert period.plan.built_layers < full.plan.built_layers == FAMILIES[name]
    regimes = [(p.phase, p.regime) for p in period.phases]
    assert regimes == [(p.phase, p.regime) for p in full.phases]
    for phase in period.phases:
        assert _counts(period, phase.phase, phase.regime) == \
            _counts(full, phase.phase, phase.regime), (name, phase.phase, phase.regime)
    assert period.summary()["unlabelled_dims"] == 0
    assert period.summary()["specialised_fields"] == []


def test_layer_plan_periods():
    assert layer_plan(tiny_spec("llama-3.1-8b", layers=32).config).multiplicity == (32,)
    gemma = tiny_spec("gemma-2-9b", layers=5).config  # sliding, full, sliding, full, sliding
    assert layer_plan(gemma).multiplicity == (3, 2)
    cohere = tiny_spec("command-r7b", layers=9).config  # s s s f | s s s f | s
    assert layer_plan(cohere).multiplicity == (3, 2, 2, 2)
    dense_first = tiny_spec("qwen1.5-moe-a2.7b", layers=6, mlp_only_layers=[0]).config
    assert layer_plan(dense_first).multiplicity == (1, 5)
    assert layer_plan(gemma, full_depth=True).multiplicity == (1, 1, 1, 1, 1)


def test_signatures_shared_across_models_and_layouts():
    def sigs(report):
        return {r.role: r.signature.key for p in report.phases for r in p.graph.units}

    llama = sigs(analyze_model(tiny_spec("llama-3.1-8b"), PADDED, ["prefill"]))
    mistral = sigs(analyze_model(tiny_spec("mistral-7b"), PADDED, ["prefill"]))
    deeper = analyze_model(tiny_spec("llama-3.1-8b", layers=6), PADDED, ["prefill"])
    vocab = sigs(analyze_model(tiny_spec("llama-3.1-8b", vocab_size=512), PADDED, ["prefill"]))
    paged_report = analyze_model(tiny_spec("llama-3.1-8b"), PAGED, ["prefill"])
    paged = sigs(paged_report)
    qproj = "model.layers.*.self_attn.q_proj"
    assert llama[qproj] == mistral[qproj]
    assert llama["model.layers.*.mlp.down_proj"] == mistral["model.layers.*.mlp.down_proj"]
    # Layer count changes counts only; vocab changes only embedding and LM head.
    assert sigs(deeper) == llama
    assert {k for k in llama if llama[k] != vocab[k]} == {"model.embed_tokens", "lm_head"}
    # A GEMM keys the same in the padded [B, S, K] and flattened [1, T, K] layouts.
    assert paged[qproj] == llama[qproj]
    (paged_attention,) = [r for r in paged_report.phases[0].graph.units
                          if r.kind == "paged_attention"]
    assert paged_attention.signature.key != llama["model.layers.*.self_attn:sdpa_attention_forward"]


def test_sliding_window_regimes():
    report = analyze_model(tiny_spec("gemma-2-9b", layers=2), PADDED, ["prefill", "decode"])
    assert [(p.phase, p.regime) for p in report.phases] == [
        ("prefill", "window<"), ("prefill", "window>="),
        ("decode", "window<"), ("decode", "window>=")]
    below, above = report.phases[2], report.phases[3]
    attn_below = [r for r in below.graph.units if r.kind == "attention"]
    attn_above = [r for r in above.graph.units if r.kind == "attention"]
    assert all(r.request_dims == ["B", "P + 1"] for r in attn_below)
    # Above the window the sliding layer reads a fixed window of cached keys.
    assert sorted(r.request_dims for r in attn_above) == [["B"], ["B", "P + 1"]]


def test_moe_experts_are_one_opaque_unit():
    report = analyze_model(tiny_spec("mixtral-8x7b"), PADDED, ["prefill"])
    (experts,) = [r for r in report.phases[0].graph.units if r.kind == "moe_experts"]
    assert experts.count == 3
    assert experts.config_dims == {"hidden_size": 64, "num_experts_per_tok": 2,
                                   "num_local_experts": 4, "2*intermediate_size": 256,
                                   "intermediate_size": 128}
    assert experts.signature.data["ops"] == ["moe_experts"]
    (router,) = [r for r in report.phases[0].graph.units if r.kind == "router"]
    assert "topk" in router.signature.data["ops"]


def test_paged_engine_phases():
    report = analyze_model(tiny_spec("llama-3.1-8b"), PAGED, ["prefill", "decode"])
    prefill, decode = report.phases
    attn = {r.kind: r for r in prefill.graph.units}
    assert attn["paged_attention"].signature.data["ops"] == ["paged_attention"]
    assert attn["kv_cache_write"].count == 3
    assert attn["lm_head"].request_dims == ["N"]  # logits for each sequence's last token
    # T = N in decode; N + 1 is the length of the cumulative sequence offsets.
    assert {d for r in decode.graph.units for d in r.request_dims} == {"N", "N + 1"}


def test_analyze_graph_on_a_torch_export_graph():
    """The labelled report does not depend on how the graph was captured."""
    import transformers

    spec = tiny_spec("llama-3.1-8b", layers=1)
    spec.config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(spec.config).eval()
    batch, seq = torch.export.Dim("B", min=2), torch.export.Dim("S", min=2)
    ids = torch.zeros((2, 8), dtype=torch.long, device="meta")
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                             dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
                             strict=False)
    report = analyze_graph(ep.module())
    roles = {r.role: r.kind for r in report.units}
    # Only `forward` frames are recorded here; helpers are read from the statement's source.
    assert roles == {
        "model.embed_tokens": "embedding", "model:arange": "positions",
        "model:create_causal_mask": "mask", "model.rotary_emb": "rotary_cache",
        "model.layers.*.input_layernorm": "norm", "model.layers.*.self_attn.q_proj": "gemm",
        "model.layers.*.self_attn.k_proj": "gemm", "model.layers.*.self_attn.v_proj": "gemm",
        "model.layers.*.self_attn:apply_rotary_pos_emb": "rotary",
        "model.layers.*.self_attn:attention_interface": "attention",
        "model.layers.*.self_attn.o_proj": "gemm", "model.layers.*": "residual",
        "model.layers.*.post_attention_layernorm": "norm",
        "model.layers.*.mlp.gate_proj": "gemm", "model.layers.*.mlp.act_fn": "act_mul",
        "model.layers.*.mlp.up_proj": "gemm", "model.layers.*.mlp.down_proj": "gemm",
        "model.norm": "norm", "lm_head": "lm_head"}
    rotary_cache = next(r for r in report.units if r.kind == "rotary_cache")
    assert {"cos", "sin", "matmul"} <= set(rotary_cache.signature.data["ops"])
    assert report.taint.unlabelled == []
    assert report.taint.unattributed > 0  # plain ints: no provenance without symbolic config
    assert report.taint.request > 0


def test_partition_covers_every_kernel(llama_prefill):
    cap, _ = llama_prefill
    units = partition(cap.gm)
    from dooly_fx.passes.partition import is_view

    kernels = [n for n in cap.gm.graph.nodes if n.op == "call_function" and not is_view(n)]
    assert all("dooly.unit" in n.meta for n in kernels)
    assert sum(len(u.compute_nodes) for u in units) == len(kernels)


@pytest.mark.parametrize("engine", [PADDED, PAGED], ids=["padded", "paged"])
def test_units_do_not_depend_on_where_packages_are_installed(engine):
    """A Python environment whose path has a `torch` folder in it (`/opt/torch/.venv`) holds
    transformers there too: its frames still name each call site, so the units, their roles
    and their signatures are those of any other install."""
    (cap,) = capture(tiny_spec("llama-3.1-8b"), engine, "decode")
    taint(cap.gm, cap.symbols)

    def units():
        return sorted((u.role, signature(u).key) for u in partition(cap.gm))

    here = units()
    packages = re.compile(r'File "[^"]*?[/\\](?:site|dist)-packages[/\\]')
    for node in cap.gm.graph.nodes:
        if node.meta.get("stack_trace"):
            node.meta["stack_trace"] = packages.sub(
                'File "/opt/torch/.venv/lib/python3.12/site-packages/', node.meta["stack_trace"])
    assert "/opt/torch/.venv/" in "".join(n.meta.get("stack_trace") or ""
                                          for n in cap.gm.graph.nodes)
    assert units() == here
    assert {role for role, _ in here} >= {"model.layers.*.self_attn:apply_rotary_pos_emb"}


def test_analyze_graph_from_a_torch_compile_backend():
    """The library call works on the ATen graph a torch.compile (aot_autograd) backend sees."""
    import transformers
    from torch._dynamo.backends.common import aot_autograd

    spec = tiny_spec("llama-3.1-8b", layers=1)
    spec.config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(spec.config).eval()
    reports = []

    def compiler(gm, example_inputs):
        reports.append(analyze_graph(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=compiler), dynamic=True)
        compiled(input_ids=torch.zeros((2, 8), dtype=torch.long), use_cache=False)
    (report,) = reports
    roles = {r.role: r.kind for r in report.units}
    assert roles["model.layers.*.self_attn.k_proj"] == "gemm"
    assert roles["lm_head"] == "lm_head"
    assert Counter(r.kind for r in report.units)["gemm"] == 7
    assert report.taint.unlabelled == [] and report.taint.request > 0


def test_structure_cache_reuses_graphs_only_when_guards_hold():
    from dooly_fx.capture import clear_cache

    clear_cache()
    (small,) = capture(tiny_spec("llama-3.1-8b"), PADDED, "decode")
    (wide,) = capture(tiny_spec("llama-3.1-8b", hidden_size=128, intermediate_size=256),
                      PADDED, "decode")
    assert wide.seconds < small.seconds / 5  # reused: relabelled, not traced again
    taint(small.gm, small.symbols)
    taint(wide.gm, wide.symbols)
    assert _labels(_linear(small.gm, "down_proj"))[-1] == Config(64, "hidden_size")
    assert _labels(_linear(wide.gm, "down_proj"))[-1] == Config(128, "hidden_size")
    # MHA (kv heads == heads) takes another code path in the model: the guard fails, so the
    # graph is traced anew rather than relabelled.
    (mha,) = capture(tiny_spec("llama-3.1-8b", num_key_value_heads=4), PADDED, "decode")
    assert mha.seconds > 5 * wide.seconds
    taint(mha.gm, mha.symbols)
    assert _labels(_linear(mha.gm, "k_proj"))[-1] == Config(64, "head_dim*num_key_value_heads")
