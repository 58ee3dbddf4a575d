"""Branch forms: the few graph shapes every method's unmerged adapter reduces to.

A form owns its slots (suffix, shape with symbolic dims, the default that makes it a no-op) and
builds its ONNX nodes from slot values, plain (``A [in, r]``) or per row (``A [batch, in, r]``,
gathered from a bank). Forms compose: a module may carry several, applied in stage order, and
because each one's default is an exact no-op an adapter fills only its own forms' slots::

    stage 0 (input)   ia3_in     x' = x * l                 l [in]            ones
                      rotate_in  x' = x R (block-diagonal)  R [n, b, b]       identity
    the base Linear   y = x' W (+ bias)
    stage 1 (add)     lora       y' = y + (x' A) B          A [in, r], B [r, out]   rank 0
                      dense      y' = y + x'[.., :d] D      D [d, out]        d = 0 (no rows)
    stage 2 (output)  dora       y' = (y - bias) f + bias   f [out]           ones
                      ia3_out    y' = y * l                 l [out]           ones

Which methods use which: LoRA/rsLoRA/VeRA/AdaLoRA/MiSS/HRA -> lora (scales, projections and
reflections folded in numpy); DoRA -> lora + dora; BOFT -> rotate_in (one dense block) + dora;
OFT -> rotate_in; IA3 -> ia3_in or ia3_out; LoHa/LoKr/FourierFT -> dense (no per-row form).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

    from ..graph.branch import BranchBuilder


@dataclass(frozen=True)
class SlotSpec:
    """One slot of a form: ``shape`` holds ints and symbolic names (one per module, zero-padded
    when adapters are stacked into banks); ``default`` is ``zeros``, ``ones`` or ``identity``."""

    suffix: str
    shape: tuple[int | str, ...]
    default: str


class Form(abc.ABC):
    name: ClassVar[str]
    stage: ClassVar[int]            # 0 input, 1 add, 2 output
    per_row: ClassVar[bool] = True  # has a per-row (bank) form

    @abc.abstractmethod
    def slot_specs(self, module: str, in_features: int, out_features: int,
                   example: Mapping[str, np.ndarray] | None) -> list[SlotSpec]:
        """The slots at ``module``; fixed dims that depend on the adapter (OFT's block size)
        are read from ``example``, one adapter's tensors for this form."""

    @abc.abstractmethod
    def build(self, g: BranchBuilder, v: Mapping[str, ir.Value]) -> None:
        """Add the nodes: stage 0 updates ``g.x``, stages 1-2 update ``g.y``."""


def symbolic(name: str, module: str) -> str:
    """One symbolic dim per module (``lora_r.<module>``): ONNX Runtime assumes equal dim names
    are equal sizes, and modules of one run may have different ranks."""
    return f"{name}.{module}"


class LoraForm(Form):
    name, stage = "lora", 1
    A, B = "lora_A.weight", "lora_B.weight"

    def slot_specs(self, module, in_features, out_features, example):
        r = symbolic("lora_r", module)
        return [SlotSpec(self.A, (in_features, r), "zeros"), SlotSpec(self.B, (r, out_features), "zeros")]

    def build(self, g, v):
        low = g.op("MatMul", [g.x, v[self.A]], "lora_A")          # [.., r]
        g.y = g.op("Add", [g.y, g.op("MatMul", [low, v[self.B]], "lora_B")], "lora_add")


class DenseForm(Form):
    """``y + x[.., :d] D`` with ``D [d, out]``: d = in for an adapter, 0 by default, so an unused
    dense slot costs a Shape and an empty MatMul, not a dense one."""

    name, stage, per_row = "dense", 1, False
    D = "delta.weight"

    def slot_specs(self, module, in_features, out_features, example):
        return [SlotSpec(self.D, (symbolic("dense_rows", module), out_features), "zeros")]

    def build(self, g, v):
        rows = g.op("Slice", [g.op("Shape", [v[self.D]], "dense_shape"), g.const([0]), g.const([1])], "dense_rows")
        x = g.op("Slice", [g.x, g.const([0]), rows, g.const([-1])], "dense_x")
        g.y = g.op("Add", [g.y, g.op("MatMul", [x, v[self.D]], "dense")], "dense_add")


class _ChannelScale(Form):
    """A vector multiplying the last axis: ``[n]``, or ``[batch, n]`` per row (unsqueezed to
    ``[batch, 1, n]`` against ``[batch, seq, n]``)."""

    suffix: ClassVar[str]

    def scale(self, g: BranchBuilder, value: ir.Value) -> ir.Value:
        return g.op("Unsqueeze", [value, g.const([1])], f"{self.name}_rows") if g.batched else value


class Ia3OutForm(_ChannelScale):
    name, stage, suffix = "ia3_out", 2, "ia3_l.out"

    def slot_specs(self, module, in_features, out_features, example):
        return [SlotSpec(self.suffix, (out_features,), "ones")]

    def build(self, g, v):
        g.y = g.op("Mul", [g.y, self.scale(g, v[self.suffix])], "ia3_out")


class Ia3InForm(_ChannelScale):
    name, stage, suffix = "ia3_in", 0, "ia3_l.in"

    def slot_specs(self, module, in_features, out_features, example):
        return [SlotSpec(self.suffix, (in_features,), "ones")]

    def build(self, g, v):
        g.x = g.op("Mul", [g.x, self.scale(g, v[self.suffix])], "ia3_in")


class DoraForm(_ChannelScale):
    """Scale the Linear's output without its bias: ``(y - bias) f + bias`` (DoRA's factor
    ``m / ||W + dW||_row``, BOFT's ``boft_s``)."""

    name, stage, suffix = "dora", 2, "dora_factor"

    def slot_specs(self, module, in_features, out_features, example):
        return [SlotSpec(self.suffix, (out_features,), "ones")]

    def build(self, g, v):
        f = self.scale(g, v[self.suffix])
        bias = g.bias
        if bias is None:
            g.y = g.op("Mul", [g.y, f], "dora")
            return
        plain = g.op("Sub", [g.y, bias], "dora_unbias")
        g.y = g.op("Add", [g.op("Mul", [plain, f], "dora"), bias], "dora_bias")


class RotateInForm(Form):
    """Block-diagonal rotation of the input, ``x' = x R``: ``R [n, b, b]``, ``n * b = in``
    (OFT's blocks; BOFT's butterfly product as one block ``[1, in, in]``)."""

    name, stage = "rotate_in", 0
    R = "rotation.weight"

    def slot_specs(self, module, in_features, out_features, example):
        n, b = (1, in_features) if example is None else tuple(int(d) for d in example[self.R].shape[:2])
        return [SlotSpec(self.R, (n, b, b), "identity")]

    def build(self, g, v):
        rot = v[self.R]
        shape = rot.shape if rot.shape is not None else getattr(rot.const_value, "shape", None)
        if shape is None:
            from ..errors import OnnxPeftError

            raise OnnxPeftError(f"{g.module}: the rotation slot {rot.name} has no known shape")
        n, b = (int(d) for d in shape[-3:-1])
        if g.batched:  # x [batch, s, in] -> [batch, s, n, 1, b] @ R [batch, 1, n, b, b]
            blocks = g.op("Reshape", [g.x, g.const([0, -1, n, 1, b])], "rotate_blocks")
            rot = g.op("Unsqueeze", [rot, g.const([1])], "rotate_rows")
        else:         # x [.., in] -> [-1, n, 1, b] @ R [n, b, b]
            blocks = g.op("Reshape", [g.x, g.const([-1, n, 1, b])], "rotate_blocks")
        rotated = g.op("MatMul", [blocks, rot], "rotate")
        g.x = g.op("Reshape", [rotated, g.op("Shape", [g.x], "rotate_shape")], "rotate_back")


FORMS: dict[str, Form] = {f.name: f for f in (Ia3InForm(), RotateInForm(), LoraForm(), DenseForm(),
                                              DoraForm(), Ia3OutForm())}


def form(name: str) -> Form:
    from ..errors import OnnxPeftError

    if name not in FORMS:
        raise OnnxPeftError(f"unknown branch form {name!r}; known: {', '.join(FORMS)}")
    return FORMS[name]


def default_array(shape: tuple[int, ...], default: str, dtype: Any) -> np.ndarray:
    """A slot's no-op value at ``shape`` (symbolic dims already resolved to ints)."""
    if default == "ones":
        return np.ones(shape, dtype)
    if default == "identity":
        return np.broadcast_to(np.eye(shape[-1], dtype=dtype), shape).copy()
    return np.zeros(shape, dtype)
