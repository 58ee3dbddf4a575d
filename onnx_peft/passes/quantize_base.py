"""QuantizeBase: turn a float ONNX base into a 4-bit one, keeping adapter slots and branches float.

Each base Linear (:func:`graph.modules.find_linear_sites`) becomes an ONNX Runtime contrib MatMul::

    MatMul(x, W [in, out]) (+ bias)  ->  MatMulBnb4(x, B uint8 [out*in/2], absmax [out*in/bs])  nf4/fp4
                                     ->  MatMulNBits(x, B uint8 [out, in/bs, bs/2], scales, zp)  int4

NF4/FP4 codes come from :mod:`onnx_peft.quant.formats`, bit-identical to bitsandbytes, so a
QLoRA base deploys with exactly the weights it trained on (``QuantizeBase.from_states`` writes
given codes without re-quantizing); int4 uses onnxruntime.quantization's own MatMulNBits
quantizer. Quantized weights are ``ir.LazyTensor``: each is computed from the memory-mapped
float weight while the model is saved, one at a time. Double quantization changes the absmax
values (as bitsandbytes does); the graph stores them de-quantized as float (MatMulBnb4 takes
float absmax). Adapter branches (``metadata_props["onnx_peft.branch"]``) and slot inputs are
never touched. :func:`set_requantized_weight` is MergeAdapters' dequantize-merge-requantize.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ..errors import NoAdapterSitesError, require_onnxruntime
from ..graph.branch import BRANCH_KEY
from ..graph.module_map import match_module
from ..graph.modules import LinearSite, constant_array, find_linear_sites
from ..graph.sites import remove_dead
from ..quant.formats import (
    BLOCKSIZES_4BIT,
    QuantizationError,
    QuantState4bit,
    dequantize_4bit,
    quantize_4bit,
)

MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = ("MatMulBnb4", "MatMulNBits")
QUANT_TYPES = ("nf4", "fp4", "int4")
QUANT_KEY = "onnx_peft.quant"             # node metadata: {"quant_type", "double_quant"}
QUANTIZATION_KEY = "onnx_peft.quantization"  # model metadata: what QuantizeBase did
_BNB4_CODE = {"fp4": 0, "nf4": 1}


# ---------------------------------------------------------------- reading a 4-bit node back


@dataclass
class QuantizedWeight:
    """The weight of a ``MatMulBnb4``/``MatMulNBits`` node, readable as ``W [out, in]`` float32."""

    node: ir.Node
    quant_type: str      # "nf4" | "fp4" | "int4"
    block_size: int
    in_features: int     # K
    out_features: int    # N
    double_quant: bool = False
    inputs: tuple[ir.Value | None, ...] = ()  # the node's weight inputs when read (B, absmax | scales, zp)

    def state(self) -> QuantState4bit:
        """The bitsandbytes state (nf4/fp4 only): packed codes and float absmax."""
        packed, absmax = (constant_array(v) for v in self.inputs[:2])
        return QuantState4bit(self.quant_type, self.block_size, (self.out_features, self.in_features),
                              np.asarray(packed, np.uint8).reshape(-1), np.asarray(absmax, np.float32).reshape(-1))

    def dequantize(self) -> np.ndarray:
        """``W [out, in]`` float32 as the contrib op computes it."""
        if self.quant_type != "int4":
            return dequantize_4bit(self.state())
        inputs = self.inputs
        zero_points = constant_array(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        return dequantize_nbits(constant_array(inputs[0]), constant_array(inputs[1]), zero_points,
                                self.in_features, self.out_features, self.block_size)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                     k: int, n: int, block_size: int) -> np.ndarray:
    """MatMulNBits' 4-bit weight -> ``[N, K]`` float32: ``(q - zp) * scale`` per block of K;
    ``packed [N, K/bs, bs/2]`` low nibble first, ``zp`` packed the same way (default 8)."""
    blocks = -(-k // block_size)
    packed = np.asarray(packed, np.uint8).reshape(n, blocks, block_size // 2)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 8.0, np.float32)
    else:
        zp_bytes = np.asarray(zero_points, np.uint8).reshape(n, -1)
        zp = np.stack([zp_bytes & 0x0F, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    scale = np.asarray(scales, np.float32).reshape(n, blocks)
    return ((q - zp[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]


def read_quantized(node: ir.Node) -> QuantizedWeight | None:
    """The QuantizedWeight of a 4-bit contrib MatMul with constant inputs, else None."""
    if node.domain != MS_DOMAIN or node.op_type not in QUANTIZED_OPS or len(node.inputs) < 3:
        return None
    if any(constant_array(v) is None for v in node.inputs[1:3]):
        return None
    attrs = node.attributes
    meta = json.loads(node.metadata_props.get(QUANT_KEY, "{}"))
    if node.op_type == "MatMulBnb4":
        quant_type = {v: k for k, v in _BNB4_CODE.items()}.get(attrs.get_int("quant_type", 1))
        if quant_type is None:
            return None
    else:
        if attrs.get_int("bits", 4) != 4:
            return None
        quant_type = "int4"
    return QuantizedWeight(node, quant_type, attrs.get_int("block_size"), attrs.get_int("K"),
                           attrs.get_int("N"), bool(meta.get("double_quant", False)), tuple(node.inputs[1:]))


def dequantized_weight_value(node: ir.Node, quantized: QuantizedWeight) -> ir.Value:
    """A stand-in ``W [out, in]`` value (not in the graph) for :class:`LinearSite.weight`: its
    const_value dequantizes on ``.numpy()``, so passes that read base weights work unchanged."""
    cached = node.meta.get("onnx_peft.dequantized_weight")
    if cached is not None:
        return cached
    source = node.inputs[1]
    dtype = node.inputs[2].dtype or ir.DataType.FLOAT  # absmax / scales carry the float type
    shape = ir.Shape([quantized.out_features, quantized.in_features])
    name = source.name or ""
    name = name.split(".weight.")[0] + ".weight" if ".weight." in name else name  # "<module>.weight"

    def compute() -> ir.TensorProtocol:
        return ir.tensor(quantized.dequantize().astype(dtype.numpy()), name=name)

    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=shape,
                     const_value=ir.LazyTensor(compute, dtype=dtype, shape=shape, name=name))
    value.metadata_props.update(source.metadata_props)
    node.meta["onnx_peft.dequantized_weight"] = value
    return value


# ---------------------------------------------------------------- building 4-bit nodes


class _Once:
    """Computes a quantization once for the two or three lazy tensors that share it."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]]) -> None:
        self._compute, self._parts, self._taken = compute, None, set()

    def part(self, key: str) -> np.ndarray:
        if self._parts is None:
            self._parts = self._compute()
        result = self._parts[key]
        self._taken.add(key)
        if self._taken >= set(self._parts):  # every part written: drop the arrays
            self._parts, self._taken = None, set()
        return result


def _lazy_initializer(graph: ir.Graph, name: str, once: _Once, key: str, dtype: ir.DataType,
                      shape: tuple[int, ...]) -> ir.Value:
    def compute() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(once.part(key)).astype(dtype.numpy()).reshape(shape), name=name)

    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                     const_value=ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name))
    graph.register_initializer(value)
    return value


def _bnb4_parts(state: QuantState4bit) -> dict[str, np.ndarray]:
    return {"B": state.packed, "absmax": state.absmax}


def _nbits_parts(weight_out_in: np.ndarray, block_size: int, symmetric: bool,
                 accuracy_level: int | None) -> dict[str, np.ndarray]:
    require_onnxruntime()
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4,
                                          accuracy_level=accuracy_level)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_out_in.T, dtype=np.float32))
    parts = {"B": packed, "scales": scales}
    if not symmetric:
        parts["zero_points"] = zero_points
    return parts


def _spec(quant_type: str, block_size: int, k: int, n: int) -> dict[str, tuple[ir.DataType | None, tuple]]:
    """Initializer dtypes (None = the float type) and shapes of each part."""
    if quant_type != "int4":
        return {"B": (ir.DataType.UINT8, ((n * k + 1) // 2,)), "absmax": (None, (-(-n * k // block_size),))}
    blocks = -(-k // block_size)
    return {"B": (ir.DataType.UINT8, (n, blocks, block_size // 2)), "scales": (None, (n, blocks)),
            "zero_points": (ir.DataType.UINT8, (n, (blocks + 1) // 2))}


def build_quantized_inputs(graph: ir.Graph, site: LinearSite, quant_type: str, block_size: int,
                           parts: Callable[[], dict[str, np.ndarray]], symmetric: bool = False,
                           tag: str = "q4") -> list[ir.Value]:
    """Lazy initializers ``[B, absmax]`` or ``[B, scales(, zero_points)]`` for ``site``."""
    once = _Once(parts)
    float_type = site.weight.dtype or site.weight.const_value.dtype
    values = []
    for key, (dtype, shape) in _spec(quant_type, block_size, site.in_features, site.out_features).items():
        if key == "zero_points" and symmetric:
            continue
        name = f"{site.module}.weight.{tag}" if key == "B" else f"{site.module}.weight.{tag}.{key}"
        values.append(_lazy_initializer(graph, name, once, key, dtype or float_type, shape))
    values[0].metadata_props.update(site.weight.metadata_props)  # keep folded_from: the module path
    return values


def _attributes(quant_type: str, block_size: int, k: int, n: int, accuracy_level: int | None) -> dict:
    attrs = {"K": k, "N": n, "block_size": block_size}
    if quant_type == "int4":
        attrs["bits"] = 4
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
    else:
        attrs["quant_type"] = _BNB4_CODE[quant_type]
    return attrs


def replace_with_quantized(graph: ir.Graph, site: LinearSite, quant_type: str, block_size: int,
                           inputs: list[ir.Value], double_quant: bool = False,
                           accuracy_level: int | None = None) -> ir.Node:
    """Swap the site's MatMul/Gemm for the contrib op (+ the Gemm's bias Add); the result keeps
    the old output's name, metadata and consumers."""
    old = site.node
    op_type = "MatMulNBits" if quant_type == "int4" else "MatMulBnb4"
    meta = dict(old.metadata_props)
    meta[QUANT_KEY] = json.dumps({"quant_type": quant_type, "double_quant": double_quant})
    new = ir.node(op_type, [old.inputs[0], *inputs],
                  _attributes(quant_type, block_size, site.in_features, site.out_features, accuracy_level),
                  domain=MS_DOMAIN, name=f"{old.name}_{op_type}" if old.name else f"{site.module}/{op_type}",
                  metadata_props=meta)
    graph.insert_before(old, new)
    last = new
    if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
        last = ir.node("Add", [new.outputs[0], old.inputs[2]], name=f"{old.name or site.module}/bias")
        graph.insert_after(new, last)
    old_out, out = old.outputs[0], last.outputs[0]
    out.type, out.shape = old_out.type, old_out.shape
    name, old_out.name = old_out.name, f"{old_out.name}.float"
    ir.convenience.replace_all_uses_with(old_out, out, replace_graph_outputs=True)
    out.name = name
    remove_dead(graph, [old] + [p for p in _weight_producers(site)])
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return new


def _weight_producers(site: LinearSite) -> list[ir.Node]:
    """The Transpose/Identity nodes between the float weight and the node (now dead)."""
    found, value = [], site.node.inputs[1]
    while value is not None and (producer := value.producer()) is not None \
            and producer.op_type in ("Transpose", "Identity"):
        found.append(producer)
        value = producer.inputs[0]
    return found


# ---------------------------------------------------------------- the pass


def _check_options(quant_type: str, block_size: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"QuantizeBase: unknown quant type {quant_type!r}; use one of {', '.join(QUANT_TYPES)}")
    if quant_type == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise QuantizationError(
            f"QuantizeBase: int4 (MatMulNBits) needs a power-of-two block size >= 16, got {block_size}")
    if quant_type != "int4" and block_size not in BLOCKSIZES_4BIT:
        raise QuantizationError(
            f"QuantizeBase: {quant_type} block size {block_size} is not one bitsandbytes supports; use one "
            f"of {BLOCKSIZES_4BIT}")


class QuantizeBase(InPlacePass):
    """Quantize every base Linear except ``skip`` (module names or path suffixes) to 4 bits.

    ``quant_type``: ``nf4``/``fp4`` (MatMulBnb4, bitsandbytes codes; ``double_quant`` as
    bitsandbytes' ``bnb_4bit_use_double_quant``) or ``int4`` (MatMulNBits; ``symmetric``,
    ``accuracy_level`` as ONNX Runtime's quantizer). After the call ``quantized`` lists the
    modules done. ``strict``: raise when there is no Linear to quantize.
    """

    def __init__(self, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False,
                 skip: Iterable[str] = ("lm_head",), symmetric: bool = False,
                 accuracy_level: int | None = None, strict: bool = True) -> None:
        super().__init__()
        _check_options(quant_type, block_size)
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.skip, self.symmetric, self.accuracy_level, self.strict = tuple(skip), symmetric, accuracy_level, strict
        self.states: dict[str, QuantState4bit] | None = None
        self.quantized: list[str] = []

    @classmethod
    def from_states(cls, states: Mapping[str, QuantState4bit], skip: Iterable[str] = ()) -> QuantizeBase:
        """Write the given bitsandbytes states (``{module path: QuantState4bit}``, e.g. from a
        4-bit torch model or checkpoint) exactly; other Linears stay float."""
        quantize = cls(skip=skip)
        quantize.states = dict(states)
        return quantize

    def _skipped(self, module: str) -> bool:
        base = module.split("#")[0]
        return any(base == s or base.endswith("." + s) for s in self.skip)

    def call(self, model: ir.Model) -> PassResult:
        self.quantized = []
        sites = find_linear_sites(model)
        wanted = self._match_states(sites) if self.states is not None else None
        done: dict[int, list[ir.Value]] = {}  # a shared float weight is quantized once
        for module, site in sites.items():
            if site.quantized is not None or BRANCH_KEY in site.node.metadata_props or self._skipped(module):
                continue
            if wanted is not None and module not in wanted:
                continue
            quant_type, block_size, double_quant, parts = self._plan(site, wanted[module] if wanted else None)
            key = id(site.weight)
            if key not in done:
                done[key] = build_quantized_inputs(model.graph, site, quant_type, block_size, parts,
                                                   self.symmetric and quant_type == "int4")
            replace_with_quantized(model.graph, site, quant_type, block_size, done[key], double_quant,
                                   self.accuracy_level)
            self.quantized.append(module)
        if not self.quantized and self.strict:
            raise NoAdapterSitesError("QuantizeBase: the model has no float Linear (MatMul/Gemm with a constant "
                                      "2-D weight) left to quantize")
        if self.quantized:
            model.metadata_props[QUANTIZATION_KEY] = json.dumps(self._summary())
        return PassResult(model, modified=bool(self.quantized))

    def _summary(self) -> dict:
        if self.states is not None:
            return {"source": "states", "modules": {m: [self.states[m].quant_type, self.states[m].blocksize]
                                                    for m in sorted(self.states)}}
        return {"quant_type": self.quant_type, "block_size": self.block_size,
                "double_quant": self.double_quant, "modules": sorted(self.quantized)}

    def _match_states(self, sites: Mapping[str, LinearSite]) -> dict[str, QuantState4bit]:
        matched = {}
        for module, state in self.states.items():
            target = match_module(module, sites)
            if target is None:
                raise QuantizationError(f"QuantizeBase: quantized module {module} matches no Linear of the model "
                                        f"(the model has e.g. {', '.join(list(sites)[:3])})")
            site = sites[target]
            if state.shape != (site.out_features, site.in_features):
                raise QuantizationError(
                    f"QuantizeBase: module {module}: its 4-bit state has shape {list(state.shape)} but the "
                    f"model's Linear is [{site.out_features}, {site.in_features}] ([out, in])")
            matched[target] = state
        return matched

    def _plan(self, site: LinearSite, state: QuantState4bit | None):
        """``(quant_type, block_size, double_quant, parts())`` for one site."""
        if state is not None:
            return state.quant_type, state.blocksize, state.nested is not None, lambda: _bnb4_parts(state)
        tensor, layout, module = site.weight.const_value, site.weight_layout, site.module
        n = site.in_features * site.out_features
        if self.quant_type != "int4" and n % self.block_size:
            raise QuantizationError(
                f"QuantizeBase: module {module}: block size {self.block_size} does not divide its "
                f"{site.out_features}x{site.in_features} weight; pick a block size that divides out*in")

        def read() -> np.ndarray:
            stored = tensor.numpy()
            return np.asarray(stored if layout == "out_in" else stored.T, np.float32)

        if self.quant_type == "int4":
            return "int4", self.block_size, False, lambda: _nbits_parts(
                read(), self.block_size, self.symmetric, self.accuracy_level)
        return self.quant_type, self.block_size, self.double_quant, lambda: _bnb4_parts(
            quantize_4bit(read(), self.quant_type, self.block_size, self.double_quant, name=module))


# ---------------------------------------------------------------- merging onto a 4-bit base


def set_requantized_weight(graph: ir.Graph, site: LinearSite, merged_out_in: Callable[[np.ndarray], np.ndarray],
                           errors: dict[str, float] | None = None) -> None:
    """MergeAdapters on a 4-bit site: ``requantize(merged_out_in(dequantize(W)))`` at save time,
    same quant type and block size; ``errors[module]`` gets the max |error| requantizing adds."""
    quantized = site.quantized
    old_inputs = list(site.node.inputs[1:])

    def parts() -> dict[str, np.ndarray]:
        merged = np.asarray(merged_out_in(quantized.dequantize()), np.float32)
        if quantized.quant_type == "int4":
            result = _nbits_parts(merged, quantized.block_size, len(old_inputs) < 3, None)
            back = dequantize_nbits(result["B"], result["scales"], result.get("zero_points"),
                                    quantized.in_features, quantized.out_features, quantized.block_size)
        else:
            state = quantize_4bit(merged, quantized.quant_type, quantized.block_size,
                                  quantized.double_quant, name=site.module)
            result, back = _bnb4_parts(state), dequantize_4bit(state)
        if errors is not None:
            errors[site.module] = float(np.abs(back - merged).max())
        return result

    symmetric = quantized.quant_type == "int4" and len(old_inputs) < 3
    values = build_quantized_inputs(graph, site, quantized.quant_type, quantized.block_size, parts,
                                    symmetric, tag="q4.merged")
    for index, value in enumerate(values, start=1):
        site.node.replace_input_with(index, value)
    site.node.meta.pop("onnx_peft.dequantized_weight", None)  # the stand-in read the old weight
    for value in old_inputs:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_input():
            graph.initializers.pop(value.name, None)
