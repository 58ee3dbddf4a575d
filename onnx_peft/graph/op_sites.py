"""Map the embedding lookups and normalization layers of a graph back to module paths.

Next to :class:`~.modules.LinearSite` (MatMul/Gemm), two more kinds of site take adapters that
change a layer's own parameters (LN Tuning, Trainable Tokens)::

    EmbeddingSite   Gather(E [vocab, hidden] initializer, ids)              ids [...] -> [..., hidden]
    NormSite        LayerNormalization(x, w, b) / SimplifiedLayerNormalization(x, w) /
                    RMSNormalization(x, w)                                   fused: the node normalizes
                    Mul(w, x_hat) [Add(., b)]                                decomposed (torch.onnx dynamo's
                                                                             RMSNorm: x_hat = x * rsqrt(..))

As for Linears, structure decides what a site is and names only say which module: the node's
``pkg.torch.onnx.name_scopes``, then its TorchScript name (``/model/norm/Mul_1``), then the
parameter's initializer name (exporters share equal initializers between modules, e.g. every
fresh RMSNorm's ones, so that name is the last resort). A site's own parameters may be shared
with other nodes: passes that change them give the node a tensor of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .modules import (
    FOLDED_FROM_KEY,
    _depends_on_inputs,
    _from_name_scopes,
    _from_node_name,
    constant_array,
    constant_source,
    find_linear_sites,
    normalize_module_path,
)

BRANCH_KEY = "onnx_peft.branch"  # graph/branch.py tags the nodes it adds with this
_FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
_PASS_THROUGH = ("Cast", "Identity")


@dataclass
class EmbeddingSite:
    """An embedding lookup ``Gather(E, ids)``: ``E [vocab, hidden]`` (in_features = vocab rows,
    out_features = hidden), ``ids`` ``[...]``, output ``[..., hidden]``."""

    module: str
    node: ir.Node
    weight: ir.Value          # the table's initializer
    in_features: int          # vocab
    out_features: int         # hidden
    kind = "embedding"
    bias = None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[1]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    branch_output = output

    def weight_out_in(self) -> np.ndarray:
        """The table ``[vocab, hidden]`` (rows are tokens)."""
        return self.weight.const_value.numpy()


@dataclass
class NormSite:
    """A normalization layer's affine part. ``input``: what the form reads (``x`` for a fused node,
    the normalized ``x_hat`` for a decomposed one); ``output``: the layer's result ``[..., hidden]``.
    ``scale``/``bias`` are the node inputs holding ``w``/``b`` (constants), at ``scale_index`` of
    ``node`` and ``bias_index`` of ``bias_node`` (the node itself when fused)."""

    module: str
    node: ir.Node
    scale_index: int
    bias_node: ir.Node | None
    bias_index: int
    in_features: int
    out_features: int
    kind = "norm"

    @property
    def fused(self) -> bool:
        return self.node.op_type in _FUSED_NORMS

    @property
    def scale(self) -> ir.Value:
        return self.node.inputs[self.scale_index]

    @property
    def bias(self) -> ir.Value | None:
        if self.bias_node is None or len(self.bias_node.inputs) <= self.bias_index:
            return None
        return self.bias_node.inputs[self.bias_index]

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0] if self.fused else self.node.inputs[1 - self.scale_index]

    @property
    def output(self) -> ir.Value:
        node = self.bias_node if self.bias_node is not None else self.node
        return node.outputs[0]

    branch_output = output

    @property
    def weight(self) -> ir.Value:
        return base_constant(self.scale, self.module)

    def affine(self) -> np.ndarray:
        """``[scale, bias]`` (``[2, hidden]``), or ``[scale]`` (``[1, hidden]``) without a bias."""
        rows = [_constant(base_constant(self.scale, self.module))]
        if self.bias is not None:
            rows.append(_constant(base_constant(self.bias, self.module)))
        return np.stack([np.asarray(r, np.float32).reshape(-1) for r in rows])

    weight_out_in = affine


def _constant(value: ir.Value | None) -> np.ndarray:
    array = constant_array(value)
    if array is None:
        from ..errors import IncompatibleAdapterError

        raise IncompatibleAdapterError(f"norm parameter {getattr(value, 'name', None)!r} is not a constant of the model")
    return array


def base_constant(value: ir.Value | None, module: str) -> ir.Value | None:
    """The base parameter behind ``value``: itself, or the first input of the ``Add(base, slot)``
    an inserted ``norm`` branch of ``module`` put in front of the node."""
    while value is not None and value.producer() is not None \
            and value.producer().metadata_props.get(BRANCH_KEY) == module and value.producer().op_type == "Add":
        value = value.producer().inputs[0]
    return value


def _vector(value: ir.Value | None, module: str) -> int | None:
    """The length of a constant 1-D parameter behind ``value``, else None."""
    source = constant_source(base_constant(value, module)) if value is not None else None
    array = None if source is None else source.const_value
    shape = None if array is None else array.shape
    return int(shape[0]) if shape is not None and len(shape) == 1 else None


def _module(node: ir.Node, param: ir.Value | None) -> str | None:
    raw = _from_name_scopes(node) or _from_node_name(node)
    if raw is None and param is not None and param.name and param.name.endswith((".weight", ".bias")):
        raw = param.name.rsplit(".", 1)[0]
    return normalize_module_path(raw) if raw else None


def _normalized(value: ir.Value) -> bool:
    """True when ``value`` is ``x * rsqrt(..)`` / ``x / sqrt(..)`` (through Cast): a normalization."""
    while value.producer() is not None and value.producer().op_type in _PASS_THROUGH:
        value = value.producer().inputs[0]
    producer = value.producer()
    if producer is None:
        return False
    roots = ("Reciprocal", "Sqrt", "Rsqrt")
    if producer.op_type == "Div":
        den = producer.inputs[1].producer()
        return den is not None and den.op_type in roots
    if producer.op_type == "Mul":
        return any(v.producer() is not None and v.producer().op_type in roots for v in producer.inputs)
    return False


def _bias_add(node: ir.Node, hidden: int, module: str) -> tuple[ir.Node, int] | None:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0].is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    return (add, index) if _vector(add.inputs[index], module) == hidden else None


def find_norm_sites(model: ir.Model) -> dict[str, NormSite]:
    """Module path -> NormSite for every LayerNorm / RMSNorm with a constant scale."""
    sites: dict[str, NormSite] = {}
    for node in model.graph:
        site = None
        if node.metadata_props.get(BRANCH_KEY) is not None:  # nodes of an inserted branch
            continue
        if node.op_type in _FUSED_NORMS and node.domain in ("", "ai.onnx", "com.microsoft"):
            module = _module(node, node.inputs[1] if len(node.inputs) > 1 else None)
            hidden = _vector(node.inputs[1], module or "") if len(node.inputs) > 1 else None
            if module and hidden:
                has_bias = node.op_type == "LayerNormalization" and len(node.inputs) > 2 and node.inputs[2] is not None
                site = NormSite(module, node, 1, node if has_bias else None, 2, hidden, hidden)
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            for index in (0, 1):
                module = _module(node, node.inputs[index])
                hidden = _vector(node.inputs[index], module or "")
                if module and hidden and _normalized(node.inputs[1 - index]):
                    bias = _bias_add(node, hidden, module)
                    site = NormSite(module, node, index, bias[0] if bias else None, bias[1] if bias else 0,
                                    hidden, hidden)
                    break
        if site is not None and site.module not in sites:
            sites[site.module] = site
    return sites


def find_embedding_sites(model: ir.Model) -> dict[str, EmbeddingSite]:
    """Module path -> EmbeddingSite for every ``Gather(E [vocab, hidden], ids, axis=0)`` whose ids
    come from the graph's inputs."""
    sites: dict[str, EmbeddingSite] = {}
    memo: dict[int, bool] = {}
    for node in model.graph:
        if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
            continue
        table = constant_source(node.inputs[0])
        if table is None or table.const_value is None or len(table.const_value.shape) != 2 \
                or not _depends_on_inputs(node.inputs[1], memo):
            continue
        module = _module(node, table)
        if module and module not in sites:
            vocab, hidden = (int(d) for d in table.const_value.shape)
            sites[module] = EmbeddingSite(module, node, table, vocab, hidden)
    return sites


def find_sites(model: ir.Model) -> dict[str, object]:
    """Every site adapters can be grafted on: Linears, embeddings and norms, by module path."""
    sites: dict[str, object] = {}
    sites.update(find_norm_sites(model))
    sites.update(find_embedding_sites(model))
    sites.update(find_linear_sites(model))
    return sites


def tied_heads(model_sites: dict[str, object], embedding: EmbeddingSite) -> list[str]:
    """Linear sites whose weight is ``embedding``'s table (tied word embeddings): the same
    initializer, or one the exporter folded from it (a pre-transposed copy)."""
    from .modules import LinearSite

    name = embedding.weight.name
    heads = []
    for module, site in model_sites.items():
        if not isinstance(site, LinearSite) or (site.in_features, site.out_features) != \
                (embedding.out_features, embedding.in_features):
            continue
        folded = site.weight.metadata_props.get(FOLDED_FROM_KEY, "")
        if site.weight is embedding.weight or (name and folded.strip("[]").replace("'", "").split(", ") == [name]):
            heads.append(module)
    return heads
