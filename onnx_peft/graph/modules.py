"""Map the base Linear computations of a graph back to PyTorch module paths.

A Linear ``y = x W^T + b`` (``W: [out, in]``) shows up in ONNX as one of::

    MatMul(x, W_io)                      W_io: [in, out] initializer      (dynamo optimized)
    MatMul(x, Transpose(W))              W:    [out, in] initializer      (dynamo optimize=False)
    Gemm(x, W, b, transB=1)              W:    [out, in]                  (TorchScript, 2-D x)
    Add(MatMul(x, W_io), b)              bias after the MatMul            (TorchScript, 3-D x)

Structure decides what a Linear is; names only say which module it belongs to. The path is
read, in order of trust, from the node's ``pkg.torch.onnx.name_scopes`` metadata, the weight's
``pkg.onnxscript.optimizer.folded_from`` metadata, the weight's initializer name, and the
TorchScript node name (``/model/layers.0/self_attn/q_proj/MatMul``). PEFT wrapper parts
(``base_model.model.``, ``.base_layer``, adapter names) are removed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from ..passes.quantize_base import QuantizedWeight

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
                  "lora_dropout", "lora_E"}
_PASS_THROUGH = {"Identity", "Dropout", "Cast"}


@dataclass
class LinearSite:
    """One base Linear computation ``x [.., in] -> [.., out]`` and where its result leaves."""

    module: str          # "model.layers.0.self_attn.q_proj"
    node: ir.Node        # the MatMul or Gemm computing x @ W
    weight: ir.Value     # the initializer value holding W
    weight_layout: str   # "in_out" (MatMul-ready [in, out]) or "out_in" ([out, in])
    in_features: int
    out_features: int
    output: ir.Value     # x W (+ bias when a bias Add / Gemm C follows directly)
    quantized: QuantizedWeight | None = None  # MatMulBnb4/MatMulNBits: weight dequantizes lazily

    def _flattened(self) -> bool:
        """True for ``Reshape(x) -> MatMul/Gemm -> Reshape back`` (GPT-2 Conv1D style)."""
        x = self.node.inputs[0]
        return self.output is not self.node.outputs[0] and x.producer() is not None \
            and x.producer().op_type == "Reshape" and self.output.producer().op_type == "Reshape"

    @property
    def input(self) -> ir.Value:
        """The activation x feeding the Linear: the tensor before a flattening Reshape when its last
        axis already is ``in`` (GPT-2's Conv1D), else the MatMul's own input (e.g. attention heads
        merged by that Reshape)."""
        x = self.node.inputs[0]
        if self._flattened():
            before = x.producer().inputs[0]
            last = before.shape[-1] if before.shape is not None and len(before.shape) else None
            if last is None or last == self.in_features:
                return before
        return x

    @property
    def branch_output(self) -> ir.Value:
        """The output at the same level as :attr:`input`: ``output``, or the flat result before the
        Reshape back when the branch reads the flattened x."""
        if self._flattened() and self.input is self.node.inputs[0]:
            return self.output.producer().inputs[0]
        return self.output

    @property
    def bias(self) -> ir.Value | None:
        """The bias value (Gemm C or the Add right after the MatMul), if any."""
        if self.node.op_type == "Gemm" and len(self.node.inputs) > 2:
            return self.node.inputs[2]
        add = _only_consumer(self.node.outputs[0])
        if add is not None and add.op_type == "Add" and self.output is not self.node.outputs[0]:
            return next(v for v in add.inputs if v is not self.node.outputs[0])
        return None

    def weight_out_in(self) -> np.ndarray:
        """W as a ``[out, in]`` array (a view of the memory-mapped tensor where possible)."""
        array = self.weight.const_value.numpy()
        return array if self.weight_layout == "out_in" else array.T

    def replace_bias(self, value: ir.Value) -> None:
        """Make the node that adds the (constant) bias read ``value`` instead: the Gemm's C, or
        the Add after the MatMul."""
        consumer = self.node if self.node.op_type == "Gemm" else self.output.producer()
        consumer.replace_input_with(next(i for i, v in enumerate(consumer.inputs) if v is self.bias), value)

    @property
    def consumed_layout(self) -> str:
        """The layout the node itself reads at its weight input: ``out_in`` for ``Gemm(transB=1)``,
        else ``in_out`` (a weight fed there directly, bypassing a Transpose in front)."""
        trans_b = self.node.attributes.get("transB")
        return "out_in" if self.node.op_type == "Gemm" and trans_b is not None and bool(trans_b.value) else "in_out"


# ---------------------------------------------------------------- structural helpers


def is_graph_input(value: ir.Value) -> bool:
    graph = value.graph
    return graph is not None and value in graph.inputs


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer or Constant output behind ``value`` (through Identity), else None.

    A graph input that is also an initializer (an overridable default) is NOT constant.
    """
    while value is not None:
        if is_graph_input(value):
            return None
        if value.const_value is not None and (value.is_initializer() or value.producer() is None):
            return value
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Constant":
            return value
        if producer.op_type == "Identity":
            value = producer.inputs[0]
            continue
        return None
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant ``value`` (initializer or Constant node), else None."""
    source = constant_source(value)
    if source is None:
        return None
    if source.const_value is not None:
        return source.const_value.numpy()
    attr = next(iter(source.producer().attributes.values()), None)
    if attr is None or attr.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        return None
    return attr.value.numpy() if attr.name == "value" else np.asarray(attr.value)


def resolve_weight(value: ir.Value) -> tuple[ir.Value, bool] | None:
    """``(initializer, transposed)`` for a 2-D constant weight, seen through Identity/Transpose."""
    transposed = False
    while value is not None:
        if is_graph_input(value):
            return None
        source = constant_source(value)
        if source is not None:
            if source.const_value is None or len(source.const_value.shape) != 2:
                return None
            return source, transposed
        producer = value.producer()
        if producer is None or producer.op_type not in ("Transpose", "Identity"):
            return None
        if producer.op_type == "Transpose":
            perm = producer.attributes.get("perm")
            if perm is not None and tuple(perm.value) != (1, 0):
                return None
            transposed = not transposed
        value = producer.inputs[0]
    return None


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _bias_add(node: ir.Node, out_features: int) -> ir.Node | None:
    """The Add right after ``node`` that adds a constant ``[out]`` bias, if there is one."""
    add = _only_consumer(node.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    array_value = constant_source(other)
    if array_value is None or array_value.const_value is None:
        return None
    shape = array_value.const_value.shape
    return add if len(shape) == 1 and shape[0] == out_features else None


def linear_of(node: ir.Node) -> tuple[ir.Value, str, int, int] | None:
    """``(weight, layout, in, out)`` when ``node`` is x @ W with a constant 2-D W, else None.

    A 4-bit contrib MatMul (MatMulBnb4/MatMulNBits) is a Linear too: its ``weight`` is a
    stand-in value outside the graph whose tensor dequantizes W ``[out, in]`` when read.
    """
    if node.domain == "com.microsoft" and node.op_type in ("MatMulBnb4", "MatMulNBits"):
        from ..passes.quantize_base import dequantized_weight_value, read_quantized

        quantized = read_quantized(node)
        if quantized is None:
            return None
        return (dequantized_weight_value(node, quantized), "out_in", quantized.in_features,
                quantized.out_features)
    if node.op_type == "MatMul":
        resolved = resolve_weight(node.inputs[1])
        if resolved is None:
            return None
        weight, transposed = resolved
        layout = "out_in" if transposed else "in_out"
    elif node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].value:
            return None
        for name in ("alpha", "beta"):
            if attrs.get(name) is not None and attrs[name].value != 1.0:
                return None
        resolved = resolve_weight(node.inputs[1])
        if resolved is None:
            return None
        weight, transposed = resolved
        trans_b = bool(attrs["transB"].value) if attrs.get("transB") is not None else False
        layout = "out_in" if trans_b != transposed else "in_out"
    else:
        return None
    rows, cols = (int(d) for d in weight.const_value.shape)
    in_features, out_features = (rows, cols) if layout == "in_out" else (cols, rows)
    return weight, layout, in_features, out_features


def _unflatten(node: ir.Node, output: ir.Value) -> ir.Value:
    """``Reshape(x 3-D -> 2-D) -> Gemm -> Reshape(back)`` (GPT-2 Conv1D): the module's output is
    the second Reshape's."""
    x_producer = node.inputs[0].producer()
    after = _only_consumer(output)
    if x_producer is not None and x_producer.op_type == "Reshape" and after is not None \
            and after.op_type == "Reshape":
        return after.outputs[0]
    return output


def _depends_on_inputs(value: ir.Value, memo: dict[int, bool]) -> bool:
    """True when ``value`` is computed from a graph input (not from constants alone)."""
    stack, seen = [value], []
    while stack:
        current = stack.pop()
        key = id(current)
        if key in memo:
            if memo[key]:
                return _remember(seen, memo, True)
            continue
        if is_graph_input(current):
            return _remember(seen, memo, True)
        seen.append(key)
        producer = current.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return _remember(seen, memo, False)


def _remember(keys: list[int], memo: dict[int, bool], result: bool) -> bool:
    if not result:
        for key in keys:
            memo[key] = False
    return result


def skip_pass_through(value: ir.Value) -> ir.Value:
    """Walk up through Identity/Dropout/Cast to the value they forward."""
    while value.producer() is not None and value.producer().op_type in _PASS_THROUGH:
        value = value.producer().inputs[0]
    return value


def lora_chain_nodes(graph: ir.Graph) -> set[ir.Node]:
    """MatMuls that are the A or B of an adapter branch, found by structure alone.

    A branch is ``MatMul(MatMul(x, A), B)`` (scalar Muls / Identity allowed in between) next to
    a base ``MatMul/Gemm(x, W)`` on the same x with ``A.in == W.in`` and ``B.out == W.out``.
    """
    linears = {node: info for node in graph if (info := linear_of(node)) is not None}
    by_input: dict[int, list[ir.Node]] = {}
    for node in linears:
        by_input.setdefault(id(skip_pass_through(node.inputs[0])), []).append(node)
    chain: set[ir.Node] = set()
    for b_node, (_, _, rank_b, out_b) in linears.items():
        value = b_node.inputs[0]
        while value.producer() is not None and value.producer().op_type in (*_PASS_THROUGH, "Mul", "Div"):
            value = value.producer().inputs[0]
        a_node = value.producer()
        if a_node not in linears:
            continue
        _, _, in_a, rank_a = linears[a_node]
        if rank_a != rank_b:
            continue
        siblings = by_input.get(id(skip_pass_through(a_node.inputs[0])), [])
        if any(s is not a_node and s is not b_node and linears[s][2] == in_a and linears[s][3] == out_b
               and rank_a < max(in_a, out_b) for s in siblings):
            chain.update((a_node, b_node))
    return chain


# ---------------------------------------------------------------- names


def normalize_module_path(path: str) -> str:
    """Remove PEFT wrapper parts: ``m.base_model.model.model.x.base_layer`` -> ``model.x``."""
    path = path.strip(".")
    marker = "base_model.model."
    index = path.find(marker)
    if index == 0 or (index > 0 and path[index - 1] == "."):
        path = path[index + len(marker):]
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in _ADAPTER_PARTS:  # "<module>.lora_A.default": keep the adapter part, drop its name
            parts = parts[: i + 1]
            break
    return ".".join(p for p in parts if p != "base_layer")


def _from_name_scopes(node: ir.Node) -> str | None:
    text = node.metadata_props.get(NAME_SCOPES_KEY)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if s]  # the last entry names the op itself
    return modules[-1] if modules else None


def _weight_names(weight: ir.Value) -> list[str]:
    names = []
    text = weight.metadata_props.get(FOLDED_FROM_KEY)
    if text:
        try:
            names.extend(n for n in ast.literal_eval(text) if isinstance(n, str))
        except (ValueError, SyntaxError):
            pass
    if weight.name:
        names.append(weight.name)
    return names


def _from_weight(weight: ir.Value) -> str | None:
    for name in _weight_names(weight):
        if name.endswith(".weight") and "." in name[: -len(".weight")]:
            return name[: -len(".weight")]
        if name.endswith(".weight"):
            return name[: -len(".weight")]
    return None


def _from_bias(node: ir.Node, out_features: int) -> str | None:
    """TorchScript keeps bias names (``base_model.model.fc1.base_layer.bias``) when weights lose theirs."""
    if node.op_type == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    else:
        add = _bias_add(node, out_features)
        bias = None if add is None else next(v for v in add.inputs if v is not node.outputs[0])
    name = bias.name if bias is not None else None
    if name and name.endswith(".bias") and _from_weight_is_real(name):
        return name[: -len(".bias")]
    return None


def _from_node_name(node: ir.Node) -> str | None:
    name = node.name or ""
    if "/" not in name:
        return None
    parts = [p for p in name.split("/") if p][:-1]  # drop the op part ("MatMul")
    return ".".join(parts) or None


def module_path_of(node: ir.Node, weight: ir.Value | None = None) -> str | None:
    """The (normalized) module path of the Linear ``node`` computes, or None if unnamed."""
    for raw in (_from_name_scopes(node), _from_weight(weight) if weight is not None else None,
                _from_node_name(node)):
        if raw:
            return normalize_module_path(raw)
    return None


def _is_adapter_path(path: str) -> bool:
    return any(part in _ADAPTER_PARTS for part in path.split("."))


def _learn_prefix(pairs: list[tuple[str, str]]) -> tuple[str, str] | None:
    """From (node-name path, trusted path) pairs, the prefix rewrite they agree on."""
    rewrites = set()
    for guess, truth in pairs:
        if guess == truth:
            rewrites.add(("", ""))
        elif guess.endswith("." + truth):
            rewrites.add((guess[: -len(truth)], ""))
        elif truth.endswith("." + guess):
            rewrites.add(("", truth[: -len(guess)]))
        else:
            return None
    return rewrites.pop() if len(rewrites) == 1 else None


def find_linear_sites(model: ir.Model) -> dict[str, LinearSite]:
    """Module path -> LinearSite for every base Linear of the main graph.

    Adapter A/B MatMuls (found by structure, or named ``lora_A``/``lora_B``) and MatMuls whose
    activation is computed from constants alone (DoRA's weight-norm trick) are left out.
    Unnamed Linears get a synthetic path ``linear.<node name>``.
    """
    graph = model.graph
    chain = lora_chain_nodes(graph)
    memo: dict[int, bool] = {}
    found: list[tuple[ir.Node, tuple, str | None, str | None]] = []
    for node in graph:
        info = linear_of(node)
        if info is None or node in chain or not _depends_on_inputs(node.inputs[0], memo):
            continue
        weight = info[0]
        trusted = _from_name_scopes(node) or _from_weight(weight) or _from_bias(node, info[3])
        from_name = _from_node_name(node)
        found.append((node, info, trusted and normalize_module_path(trusted),
                      from_name and normalize_module_path(from_name)))
    # TorchScript names carry the exporter's prefix ("model.fc1"); learn it from nodes that
    # also have a trusted name ("fc1") and apply it to the rest.
    prefix = _learn_prefix([(n, t) for _, _, t, n in found if t and n and _from_weight_is_real(t)])
    sites: dict[str, LinearSite] = {}
    for node, (weight, layout, in_f, out_f), trusted, from_name in found:
        path = trusted
        if path is None and from_name is not None:
            path = from_name
            if prefix and prefix != ("", "") and path.startswith(prefix[0]):
                path = prefix[1] + path[len(prefix[0]):]
        if path is None:
            path = f"linear.{node.name or id(node)}"
        if _is_adapter_path(path):
            continue
        bias_add = None if node.op_type == "Gemm" else _bias_add(node, out_f)
        output = bias_add.outputs[0] if bias_add is not None else node.outputs[0]
        output = _unflatten(node, output)
        site = LinearSite(path, node, weight, layout, in_f, out_f, output)
        if node.domain == "com.microsoft":
            from ..passes.quantize_base import read_quantized

            site.quantized = read_quantized(node)
        key, n = path, 1
        while key in sites:  # the same module called twice (shared weights): path, path#1, ...
            key, n = f"{path}#{n}", n + 1
        sites[key] = site
    return sites


def _from_weight_is_real(path: str) -> bool:
    """Exporter-made names (``onnx::MatMul_42``, ``val_7``) say nothing about the module."""
    return not re.match(r"^(onnx::|val_\d)", path)
