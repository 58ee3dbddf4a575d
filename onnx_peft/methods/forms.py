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
                      rotate_out y' = y C + swap(y) S       C, S [n, g]       ones, zeros
                                 (pairs g/2 apart in groups of g, n g = out; see RotateOutForm)
                      tokens     rows ``idx`` of a table replaced (see TokensForm)   idx [k] int64, R [k, h]  k = 0

Two forms sit on other sites (graph/op_sites.py): ``tokens`` on an embedding lookup (and on the
Linear of a head tied to it), ``norm`` on a LayerNorm / RMSNorm::

    norm       w' = w + dw, b' = b + db  (scale and shift)   dw, db [hidden]   zeros

Which methods use which: LoRA/rsLoRA/VeRA/AdaLoRA/MiSS/HRA/DeLoRA -> lora (scales, projections and
reflections folded in numpy); DoRA -> lora + dora; BOFT -> rotate_in (one dense block) + dora;
OFT -> rotate_in; RoAd -> rotate_out; IA3 -> ia3_in or ia3_out; LoHa/LoKr/FourierFT -> dense (no per-row form);
LN Tuning -> norm; Trainable Tokens (and LoRA's trainable_token_indices) -> tokens.
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
    dtype: str = ""  # "" = the model's float dtype; "int64" for token indices


class Form(abc.ABC):
    name: ClassVar[str]
    stage: ClassVar[int]            # 0 input, 1 add, 2 output
    per_row: ClassVar[bool] = True  # has a per-row (bank) form
    # the sites it is built on (graph/op_sites.py): "linear", "embedding", "norm"
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)

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


class RotateOutForm(Form):
    """2-D rotations of the output in groups (RoAd): ``y [.., out]`` viewed as ``[.., n, 2, g/2]``
    (``n g = out``), each element paired with the one ``g/2`` away in its group::

        y' = y * C + swap(y) * S        C, S [n, g]; swap exchanges the two halves of each group

    ``C = ones``, ``S = zeros`` is the no-op. Elementwise: ``4 out`` flops a token, any ``g``."""

    name, stage = "rotate_out", 2
    C, S = "rotate_out.cos", "rotate_out.sin"

    def slot_specs(self, module, in_features, out_features, example):
        n, size = (1, out_features) if example is None else tuple(int(d) for d in example[self.C].shape[-2:])
        return [SlotSpec(self.C, (n, size), "ones"), SlotSpec(self.S, (n, size), "zeros")]

    def build(self, g, v):
        cos, sin = v[self.C], v[self.S]
        shape = cos.shape if cos.shape is not None else getattr(cos.const_value, "shape", None)
        if shape is None:
            from ..errors import OnnxPeftError

            raise OnnxPeftError(f"{g.module}: the rotation slot {cos.name} has no known shape")
        n, half = int(shape[-2]), int(shape[-1]) // 2
        if g.batched:  # y [batch, s, out] -> [batch, s, n, 2, half]; C [batch, n, g] -> [batch, 1, n, 2, half]
            groups = g.op("Reshape", [g.y, g.const([0, -1, n, 2, half])], "rotate_out_groups")
            view = g.const([0, 1, n, 2, half])
        else:         # y [.., out] -> [-1, n, 2, half]; C [n, g] -> [n, 2, half]
            groups = g.op("Reshape", [g.y, g.const([-1, n, 2, half])], "rotate_out_groups")
            view = g.const([n, 2, half])
        cos = g.op("Reshape", [cos, view], "rotate_out_cos")
        sin = g.op("Reshape", [sin, view], "rotate_out_sin")
        swapped = g.op("Gather", [groups, g.const([1, 0])], "rotate_out_swap", axis=-2)
        rotated = g.op("Add", [g.op("Mul", [groups, cos], "rotate_out_c"), g.op("Mul", [swapped, sin], "rotate_out_s")],
                       "rotate_out")
        g.y = g.op("Reshape", [rotated, g.op("Shape", [g.y], "rotate_out_shape")], "rotate_out_back")


class TokensForm(Form):
    """Rows ``idx [k]`` (int64) of a table replaced by ``R [k, h]``, exactly: with the one-hot
    ``m = (ids == idx)`` ``[.., k]`` and ``hit = sum(m)`` ``[.., 1]`` (0 or 1)::

        embedding lookup  y [.., h] = E[ids]:      y' = y - y * hit + m R
        tied head         y [.., vocab] = x E^T:   y' = y - y * hit_col + (x R^T) m_col (+ bias * hit_col)
                          (m_col [k, vocab] = (idx == range(vocab)), hit_col its column sums)

    ``k = 0`` by default: nothing matches, ``y' = y``. Per row, banks pad ``idx`` with -1 (matches no
    token) and ``R`` with zeros. Never a vocab-sized slot."""

    name, stage, site_kinds = "tokens", 2, ("embedding", "linear")
    INDICES, ROWS = "trainable_tokens.indices", "trainable_tokens.rows"

    def slot_specs(self, module, in_features, out_features, example):
        k = symbolic("tokens_k", module)
        hidden = out_features if example is None else int(example[self.ROWS].shape[1])
        return [SlotSpec(self.ROWS, (k, hidden), "zeros"), SlotSpec(self.INDICES, (k,), "minus_one", "int64")]

    def build(self, g, v):
        idx, rows = v[self.INDICES], v[self.ROWS]
        if getattr(g.site, "kind", "linear") == "embedding":  # x: ids [..] ([batch, n] per row)
            if g.batched:
                idx = g.op("Unsqueeze", [idx, g.const([1])], "tokens_idx_rows")      # [b, 1, k]
            ids = g.op("Unsqueeze", [g.x, g.const([-1])], "tokens_ids")            # [.., 1]
            hot = g.op("Cast", [g.op("Equal", [ids, idx], "tokens_eq")], "tokens_hot", to=g.float_type)
            hit = g.op("ReduceSum", [hot, g.const([-1])], "tokens_hit", keepdims=1)  # [.., 1]
            new = g.op("MatMul", [hot, rows], "tokens_rows")                        # [.., h]
        else:  # the Linear of a tied head: x [.., h], y [.., vocab]
            cols = g.op("Range", [g.scalar(0), g.scalar(g.site.out_features), g.scalar(1)], "tokens_cols")
            idx_col = g.op("Unsqueeze", [idx, g.const([-1])], "tokens_idx")            # [(b,) k, 1]
            hot = g.op("Cast", [g.op("Equal", [idx_col, cols], "tokens_eq")], "tokens_hot", to=g.float_type)
            hit = g.op("ReduceSum", [hot, g.const([-2])], "tokens_hit", keepdims=int(g.batched))
            rows_t = g.op("Transpose", [rows], "tokens_rows_t", perm=[0, 2, 1] if g.batched else [1, 0])
            new = g.op("MatMul", [g.op("MatMul", [g.x, rows_t], "tokens_proj"), hot], "tokens_cols_new")
            if g.bias is not None:
                new = g.op("Add", [new, g.op("Mul", [hit, g.bias], "tokens_bias")], "tokens_with_bias")
        kept = g.op("Sub", [g.y, g.op("Mul", [g.y, hit], "tokens_drop")], "tokens_keep")
        g.y = g.op("Add", [kept, new], "tokens_add")


class NormForm(Form):
    """LN Tuning's scale/shift differences ``dw, db [hidden]`` on a norm site (graph/op_sites.py).

    One adapter: the node reads ``w + dw`` and ``b + db`` (two [hidden] Adds; zeros = the base).
    Per row: the normalized ``x_hat`` (the decomposed norm's own input, or the fused op again
    with unit scale and zero shift) gives ``y' = y + x_hat * dw_row + db_row``."""

    name, stage, site_kinds = "norm", 2, ("norm",)
    DW, DB = "ln_delta.weight", "ln_delta.bias"

    def slot_specs(self, module, in_features, out_features, example):
        specs = [SlotSpec(self.DW, (out_features,), "zeros")]
        if example is None or self.DB in example:
            specs.append(SlotSpec(self.DB, (out_features,), "zeros"))
        return specs

    def build(self, g, v):
        site, dw, db = g.site, v[self.DW], v.get(self.DB)
        if not g.batched:
            g.replace_input(site.node, site.scale_index, g.op("Add", [site.scale, dw], "norm_scale"))
            if db is not None and site.bias is not None:
                g.replace_input(site.bias_node, site.bias_index, g.op("Add", [site.bias, db], "norm_shift"))
            elif db is not None:
                g.y = g.op("Add", [g.y, db], "norm_shift")
            return
        x_hat = g.x
        if site.fused:  # the same normalization without its affine part
            hidden = site.out_features
            inputs = [g.x, g.array(np.ones(hidden))]
            if site.node.op_type == "LayerNormalization":
                inputs.append(g.array(np.zeros(hidden)))
            attrs = {name: attr.value for name, attr in site.node.attributes.items()}
            x_hat = g.op(site.node.op_type, inputs, "norm_x_hat", domain=site.node.domain, **attrs)
        scale = g.op("Unsqueeze", [dw, g.const([1])], "norm_scale_rows")            # [b, 1, h]
        g.y = g.op("Add", [g.y, g.op("Mul", [x_hat, scale], "norm_scale")], "norm_scale_add")
        if db is not None:
            g.y = g.op("Add", [g.y, g.op("Unsqueeze", [db, g.const([1])], "norm_shift_rows")], "norm_shift")


FORMS: dict[str, Form] = {f.name: f for f in (Ia3InForm(), RotateInForm(), LoraForm(), DenseForm(),
                                              DoraForm(), Ia3OutForm(), RotateOutForm(), TokensForm(), NormForm())}


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
    if default == "minus_one":  # token indices: -1 matches no token
        return np.full(shape, -1, dtype)
    return np.zeros(shape, dtype)
