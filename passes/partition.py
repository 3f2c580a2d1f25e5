"""Stage 4: group graph nodes into op units, one per kernel or fused kernel group.

`partition(gm) -> list[OpUnit]` writes `node.meta["dooly.unit"]` (the unit id) for every node that
belongs to a unit. Grouping is structural, from the metadata the tracer records:

* a GEMM against a parameter and an embedding lookup are units of their own;
* ops of a *leaf* module (no submodule, no GEMM: RMSNorm, the activation, the rotary-embedding
  module) form one unit per module call;
* other ops are grouped by the statement that issued them: the call-site line in the innermost
  module's `forward` and the helper it calls (`apply_rotary_pos_emb`, `sdpa_attention_forward`,
  `DynamicLayer.update`, `create_causal_mask`, ...). One Python call is one unit.

View-like ops cost no kernel; they join their group but do not make a unit on their own.

    before:  %pow, %mean, %add, %rsqrt, %mul, %to, %mul   (in layers.0.input_layernorm)
    after:   OpUnit(kind="norm", module="model.layers.0.input_layernorm", nodes=[...7 nodes])
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx

META_KEY = "dooly.unit"

aten = torch.ops.aten
_VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.expand.default, aten.alias.default,
    aten.detach.default, aten.t.default, aten.sym_size.int, aten.unflatten.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.narrow.default, aten.view_as.default, aten.expand_as.default, aten.lift_fresh.default,
    # Constants materialised from Python values (`torch.tensor(window)`): host-side, no kernel.
    aten.lift_fresh_copy.default, aten.detach_.default,
    # Metadata assertions in exported graphs.
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
}
_GEMM_OPS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
             aten.bmm.default}
_ATTENTION_OPS = {"scaled_dot_product_attention", "flex_attention", "paged_attention"}
_ACTIVATION_OPS = {"silu", "gelu", "relu", "tanh", "sigmoid", "gelu_tanh"}
_ACT_CLASSES = {"SiLU", "GELU", "ReLU", "Tanh", "Sigmoid", "GELUActivation", "SiLUActivation",
                "PytorchGELUTanh", "GELUTanh", "NewGELUActivation", "FastGELUActivation"}
_WRAPPER_MODULE = "dooly_fx.capture."
_DYNAMO_ROOT = re.compile(r"^L\['\w+'\]\.?")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n?([^\n]*)')
_CALLEE = re.compile(r"(?:^|=)\s*([\w.]+)\(")
_LAYER = re.compile(r"layers\.(\d+)(?:\.|$)")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_INSTALLED_TORCH = re.compile(r"[/\\](?:site|dist)-packages[/\\]torch[/\\]")


@dataclass(eq=False)
class OpUnit:
    """Nodes that one kernel (or one fused kernel group) executes."""

    uid: int
    kind: str
    module: str
    """HF module path of the unit, e.g. 'model.layers.0.self_attn.q_proj'."""
    call: str
    """The helper function or statement that issued it ('' for a module call)."""
    nodes: list[torch.fx.Node] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(self.module)
        return int(match.group(1)) if match else None

    @property
    def compute_nodes(self) -> list[torch.fx.Node]:
        return [n for n in self.nodes if not is_view(n)]

    @property
    def role(self) -> str:
        """Layer-independent name, e.g. 'model.layers.*.self_attn:apply_rotary_pos_emb'."""
        name = re.sub(r"layers\.\d+", "layers.*", self.module) or "root"
        return f"{name}:{self.call}" if self.call else name


def op_name(node: torch.fx.Node) -> str:
    """Short op name: 'linear', 'scaled_dot_product_attention', 'paged_attention', 'mul', ..."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return getattr(target, "__name__", str(target))


def kernel_ops(node: torch.fx.Node) -> list[str]:
    """Names of the kernels a node launches: itself, or the ops of a higher-order op's subgraph
    (`wrap_with_set_grad_enabled` around the rotary cos/sin in exported graphs)."""
    if not isinstance(node.target, torch._ops.HigherOrderOperator):
        return [op_name(node)]
    owner = node.graph.owning_module
    names = [op_name(node)]
    for arg in node.args:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and owner is not None:
            sub = fetch_attr(owner, arg.target)
            if isinstance(sub, torch.fx.GraphModule):
                names += [n for inner in sub.graph.nodes if inner.op == "call_function"
                          and not is_view(inner) for n in kernel_ops(inner)]
    return names


def is_view(node: torch.fx.Node) -> bool:
    """True for ops that launch no kernel (views, shape arithmetic, grad-mode switches)."""
    if node.op != "call_function":
        return True
    if node.target in _VIEW_OPS:
        return True
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return False  # runs a subgraph of kernels
    if not isinstance(node.target, torch._ops.OpOverload):  # operator.mul on SymInts, getitem
        return True
    if node.target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
        src, out = node.args[0], node.meta.get("val")
        if isinstance(src, torch.fx.Node) and isinstance(out, torch.Tensor):
            return src.meta.get("val") is not None and src.meta["val"].dtype == out.dtype
    if node.target in (aten.reshape.default, aten.flatten.using_ints, aten.contiguous.default):
        return _aliases_input(node)
    if node.target is aten.dropout.default:  # identity in eval mode
        return len(node.args) > 2 and node.args[2] is False
    return False


def _aliases_input(node: torch.fx.Node) -> bool:
    """Whether a reshape/contiguous returned a view of its input (no copy kernel)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    src, out = node.args[0], node.meta.get("val")
    if not isinstance(src, torch.fx.Node) or not isinstance(out, torch.Tensor):
        return True
    inp = src.meta.get("val")
    if not isinstance(inp, torch.Tensor):
        return True
    return StorageWeakRef(inp.untyped_storage()) == StorageWeakRef(out.untyped_storage())


def _module(node: torch.fx.Node) -> tuple[str, str]:
    """(HF module path, class name) of the innermost module that issued `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    entries = [(p, c if isinstance(c, str) else f"{c.__module__}.{c.__qualname__}")
               for p, c in stack.values()]
    path, cls = entries[-1]
    if entries[0][1].startswith(_WRAPPER_MODULE):
        # Our capture wrapper holds the HF model as `.model`: strip it so paths read as in the
        # HF checkpoint ('model.layers.0.mlp', 'lm_head').
        path = path.removeprefix("model").removeprefix(".")
    path = _DYNAMO_ROOT.sub("", path)  # torch.compile names the root L['self']
    return path, cls.rsplit(".", 1)[-1]


def _call_site(node: torch.fx.Node) -> str:
    """'<line>:<helper>' for the statement in the innermost `forward` that issued `node`.

    The helper is the function that statement called: the next frame when the stack is whole
    (our capture), else the callee named in the statement's source text (`torch.export` and
    `torch.compile` keep only `forward` frames): `causal_mask = create_causal_mask(`.
    """
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "")
              if not _is_torch_frame(f[0])]
    last = max((i for i, f in enumerate(frames) if f[2] == "forward"), default=None)
    if last is None:
        return ""
    if last + 1 < len(frames):
        helper = frames[last + 1][2]
    else:
        callee = _CALLEE.search(frames[last][3].strip())
        helper = callee.group(1).rsplit(".", 1)[-1] if callee else ""
    return f"{frames[last][1]}:{helper}"


def _is_torch_frame(path: str) -> bool:
    """Whether a frame's file is torch's own (its tracers, `nn.Module.__call__`): inside the
    imported torch package or an installed `torch` package. Not any path with a `torch`
    folder in it: an environment at `/opt/torch/.venv` holds transformers too, and dropping
    its frames would group a whole decoder layer's helpers as one call."""
    return path.startswith(_TORCH_DIR) or _INSTALLED_TORCH.search(path) is not None


def fetch_attr(gm: torch.fx.GraphModule, target: str) -> object:
    """The object a `get_attr` node reads; targets may be dotted ('model.norm.weight')."""
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_param(node: object, gm: torch.fx.GraphModule) -> bool:
    """A model weight: a Parameter attribute, or a graph input (lifted parameter, as in
    `torch.export` and AOT graphs) whose shape holds no symbol, unlike any activation's."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "get_attr":
        return isinstance(fetch_attr(gm, node.target), torch.nn.Parameter)
    while node.op == "call_function" and is_view(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]  # look through `t()` / views of a weight
    value = node.meta.get("val")
    return node.op == "placeholder" and isinstance(value, torch.Tensor) and \
        value.dim() >= 2 and all(isinstance(d, int) for d in value.shape)


def _anchor(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The unit kind if `node` is a unit on its own, else None."""
    if node.target in _GEMM_OPS and any(_is_param(a, gm) for a in node.args[:3]):
        return "gemm"
    name = op_name(node)
    if name == "embedding":
        return "embedding"
    if name in ("paged_attention", "kv_cache_write"):
        return name
    return None


def partition(gm: torch.fx.GraphModule) -> list[OpUnit]:
    """Group the call nodes of `gm` into units; annotate `meta[META_KEY]` with unit ids."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    modules = {n: _module(n) for n in nodes}
    anchors = {n: _anchor(n, gm) for n in nodes}
    parents = {m for n in nodes for m in _ancestors(modules[n][0])}
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in nodes:
        path, cls = modules[node]
        if anchors[node]:
            key: tuple = ("anchor", node.name)
        elif path and path not in parents:  # a leaf module: one unit per call
            key = ("module", path)
        else:
            key = ("call", path, _call_site(node))
        groups.setdefault(key, []).append(node)
    units: list[OpUnit] = []
    for key, members in groups.items():
        compute = [n for n in members if not is_view(n)]
        if not compute:
            continue
        path, cls = modules[members[0]]
        call = key[2].partition(":")[2] if key[0] == "call" else ""
        kind = anchors[members[0]] if key[0] == "anchor" else _classify(compute, path, cls, call)
        if kind == "gemm" and path.rsplit(".", 1)[-1] == "lm_head":
            kind = "lm_head"
        units.append(OpUnit(len(units), kind, path, call, members))
    units = _merge_gated_activation(_merge_elementwise_chains(units))
    for unit in units:
        for node in unit.nodes:
            node.meta[META_KEY] = unit.uid
    return units


def _ancestors(path: str) -> Iterable[str]:
    parts = path.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def _classify(compute: list[torch.fx.Node], path: str, cls: str, call: str) -> str:
    """Kind of a non-anchor group from its ops, module class and issuing helper."""
    ops = {op_name(n) for n in compute}
    call_l = call.lower()
    if ops & _ATTENTION_OPS or "attention" in call_l or \
            (any("softmax" in op for op in ops) and ops & {"matmul", "bmm"}):  # eager, inlined
        return "attention"
    if cls.endswith("Experts") or "grouped_mm" in ops:
        return "moe_experts"
    if "Norm" in cls:
        return "norm"
    if "Rotary" in cls:
        return "rotary_cache"
    if "rotary" in call_l:
        return "rotary"
    if "mask" in call_l:
        return "mask"
    if call_l == "update":
        return "kv_cache_update"
    if "topk" in ops:
        return "router"
    leaf = path.rsplit(".", 1)[-1]
    if ops & _ACTIVATION_OPS and ("act" in leaf or "Activation" in cls or cls in _ACT_CLASSES):
        return "act"
    if ops <= {"add"} and _LAYER.search(path + ".") and path.split(".")[-1].isdigit():
        return "residual"
    if ops <= {"arange", "add", "unsqueeze", "cumsum", "sub"}:
        return "positions"
    if ops & {"index", "gather", "index_select"}:
        return "gather"
    if ops <= {"clone", "contiguous", "reshape", "cat", "copy"}:
        return "copy"
    return "elementwise"


def _merge_into(target: OpUnit, source: OpUnit) -> None:
    target.nodes.extend(source.nodes)


def _renumber(units: list[OpUnit], dropped: set[int]) -> list[OpUnit]:
    kept = [u for u in units if u.uid not in dropped]
    for i, unit in enumerate(kept):
        unit.uid = i
    return kept


def _merge_elementwise_chains(units: list[OpUnit]) -> list[OpUnit]:
    """Fuse an elementwise unit into the elementwise unit that alone feeds it and that it alone
    consumes (same module): `x / cap; tanh(x); x * cap` is one softcap kernel in a fused engine."""
    owner = {n: u for u in units for n in u.nodes}
    merged: set[int] = set()
    for unit in units:
        if unit.kind != "elementwise":
            continue
        producers = {owner.get(a) for n in unit.compute_nodes for a in _data_inputs(n)}
        producers.discard(unit)
        if len(producers) != 1:
            continue
        (prev,) = producers
        if prev is None or prev.kind != "elementwise" or prev.module != unit.module:
            continue
        consumers = {owner.get(u) for n in prev.compute_nodes for u in n.users}
        if consumers - {prev} != {unit}:
            continue
        _merge_into(prev, unit)
        for node in unit.nodes:
            owner[node] = prev
        prev.call = prev.call or unit.call
        merged.add(unit.uid)
    return _renumber(units, merged)


def _data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-producing inputs of `node`, looking through views to the op that made them."""
    out = []
    for inp in node.all_input_nodes:
        while is_view(inp) and inp.op == "call_function" and inp.all_input_nodes:
            inp = inp.all_input_nodes[0]
        if inp.op == "call_function":
            out.append(inp)
    return out


def _merge_gated_activation(units: list[OpUnit]) -> list[OpUnit]:
    """Fold `act(gate) * up` into the activation unit (kind 'act_mul'), as fused engines run it."""
    producer = {n: u for u in units for n in u.nodes}
    merged: set[int] = set()
    for unit in units:
        compute = unit.compute_nodes
        if unit.kind != "elementwise" or [op_name(n) for n in compute] != ["mul"]:
            continue
        sources = {producer.get(a) for a in compute[0].all_input_nodes}
        act = next((u for u in sources if u is not None and u.kind == "act"), None)
        if act is not None:
            _merge_into(act, unit)
            act.kind = "act_mul"
            merged.add(unit.uid)
    return _renumber(units, merged)


def unit_inputs(unit: OpUnit) -> list[torch.fx.Node]:
    """Values the unit reads from outside itself, in first-use order.

    A `sym_size` reads only a shape, not the tensor, so its operand is not an input.
    """
    members = set(unit.nodes)
    seen: list[torch.fx.Node] = []
    for node in unit.nodes:
        if node.target is aten.sym_size.int:
            continue
        for inp in node.all_input_nodes:
            if inp not in members and inp not in seen:
                seen.append(inp)
    return seen


def unit_outputs(unit: OpUnit) -> list[torch.fx.Node]:
    """Compute nodes of the unit whose values are used outside it."""
    members = set(unit.nodes)
    return [n for n in unit.nodes
            if not is_view(n) and any(user not in members for user in n.users)]


def unit_subgraph(gm: torch.fx.GraphModule, unit: OpUnit) -> torch.fx.GraphModule:
    """A standalone GraphModule running just `unit`: external values become placeholders.

    Parameters read by the unit become placeholders too (weights are inputs of a benchmark).
    """
    members = set(unit.nodes)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def external(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:
            env[node] = graph.placeholder(node.name)
            env[node].meta.update(node.meta)
        return env[node]

    for inp in unit_inputs(unit):
        external(inp)
    for node in (n for n in gm.graph.nodes if n in members):
        for inp in node.all_input_nodes:  # shape-only operands of sym_size
            if inp not in env:
                external(inp)
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [env[n] for n in unit_outputs(unit)]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph)
