"""bitsandbytes' 4-bit (NF4/FP4) and LLM.int8 weight formats in numpy, bit for bit.

Why numpy: ONNX export, graph passes and the runtime must not need torch or bitsandbytes, yet
the codes they write must be the ones training used, so the dequantized base is identical.
Every step copies bitsandbytes 0.50 on CPU, including its float32 rounding order::

    weight [out, in] --flatten--> blocks of `blocksize` --absmax--> scaled = w * (1/absmax)
        --nearest code (midpoint bucketize)--> nibbles, packed two per byte, first in high bits
    packed: uint8 [out*in/2]     absmax: float32 [n_blocks]

Double quantization stores ``absmax - mean`` with bitsandbytes' 8-bit dynamic code in blocks of
256 (``nested``); :attr:`QuantState4bit.absmax` always holds the de-quantized float32 values,
so consumers never need to care. LLM.int8 (``Linear8bitLt``) is row-wise: ``CB = round(W * 127 /
SCB)``, ``SCB = max|W|`` per row.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_peft.errors import OnnxPeftError


class QuantizationError(OnnxPeftError, ValueError):
    """A weight cannot be quantized/dequantized as asked (quant type, block size, shape, state)."""


QUANT_TYPES_4BIT = ("nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# bit patterns 0b0eem / 0b1eem: 1 sign, 2 exponent, 1 mantissa bit; normalised by the largest (12)
FP4_CODE = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=np.float32) / np.float32(12)
CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# torch.argsort(FP4_CODE) as bitsandbytes computes it (+0 sorts before -0): bucket -> nibble
_FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` on CPU: a float32 step, each half
    computed from its own end with one fused multiply-add (exact in float64 for these sizes)."""
    start64, end64 = float(np.float32(start)), float(np.float32(end))
    step = float((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    values = np.where(idx < steps // 2, start64 + step * idx, end64 - step * (steps - 1 - idx))
    return values.astype(np.float32)


def _dynamic_code() -> np.ndarray:
    """bitsandbytes ``create_dynamic_map(signed=True)``: the 8-bit code of nested absmax values [256]."""
    data: list[float] = []
    for i in range(7):
        bounds = _torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-6 + i))  # torch multiplies the float32 tensor in float32
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_CODE = _dynamic_code()


@dataclass
class QuantState4bit:
    """One bitsandbytes 4-bit weight.

    ``packed``: uint8 ``[out*in/2]``, element ``2k`` in the high nibble of byte ``k`` (row-major
    ``[out, in]``); ``absmax``: float32 ``[ceil(out*in/blocksize)]``, already de-double-quantized;
    ``nested``: the double-quantized form, or None, with bitsandbytes' key names ``absmax``
    (uint8 codes), ``nested_absmax`` (float32), ``nested_quant_map`` (float32 [256]),
    ``nested_offset`` (float) and ``nested_blocksize``; ``dtype``: the original weight dtype name.
    """

    quant_type: str
    blocksize: int
    shape: tuple[int, int]
    packed: np.ndarray
    absmax: np.ndarray
    nested: dict | None = None
    dtype: str = "float32"

    @property
    def code(self) -> np.ndarray:
        """The 16 float32 values a nibble stands for."""
        return CODES_4BIT[self.quant_type]

    def codes(self) -> np.ndarray:
        """The unpacked nibbles, uint8 ``[out, in]``."""
        out, inp = self.shape
        return unpack_nibbles(self.packed, out * inp).reshape(out, inp)


# ---------------------------------------------------------------- checks


def _check_4bit(quant_type: str, blocksize: int, where: str) -> None:
    if quant_type not in QUANT_TYPES_4BIT:
        raise QuantizationError(
            f"{where}: unknown 4-bit quant type {quant_type!r}; use one of {', '.join(QUANT_TYPES_4BIT)}"
            " (or 'int4' for ONNX Runtime's MatMulNBits)")
    if blocksize not in BLOCKSIZES_4BIT:
        raise QuantizationError(
            f"{where}: block size {blocksize} is not one bitsandbytes supports; use one of {BLOCKSIZES_4BIT}")


def _check_weight(weight: np.ndarray, blocksize: int, where: str) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise QuantizationError(f"{where}: expected a 2-D weight [out, in], got shape {list(weight.shape)}")
    if weight.size % blocksize:
        raise QuantizationError(
            f"{where}: block size {blocksize} does not divide the weight's {weight.size} elements "
            f"(shape {list(weight.shape)}); pick a block size that divides out*in, e.g. 32 or 64")
    if weight.dtype.kind != "f" and weight.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 too
        raise QuantizationError(f"{where}: expected a float weight, got {weight.dtype}")
    return np.ascontiguousarray(weight, dtype=np.float32)


# ---------------------------------------------------------------- 4-bit


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[n]`` (0..15) -> bytes ``[ceil(n/2)]``, first code in the high nibble."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """bytes ``[ceil(n/2)]`` -> uint8 codes ``[n]`` (inverse of :func:`pack_nibbles`)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:n]


def quantize_4bit(weight: np.ndarray, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False, *, name: str = "weight",
                  offset: float | None = None, torch_threads: int | None = None) -> QuantState4bit:
    """Quantize ``weight [out, in]`` exactly as ``bitsandbytes.functional.quantize_4bit`` on CPU.

    Double quantization centres the absmax values on their mean, which torch computes with a
    thread-count dependent float32 sum; we reproduce it for ``torch_threads`` threads (default:
    ``torch.get_num_threads()`` when torch is already imported, else 1). ``offset`` overrides it.
    """
    _check_4bit(quant_type, blocksize, name)
    dtype = str(getattr(weight, "dtype", "float32"))
    w = _check_weight(weight, blocksize, name)
    blocks = w.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    scale = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(blocks * scale[:, None], np.float32(-1), np.float32(1)).reshape(-1)
    code = CODES_4BIT[quant_type]
    order = np.arange(16, dtype=np.uint8) if quant_type == "nf4" else _FP4_ORDER
    ordered = code[order]
    bounds = (ordered[:-1] + ordered[1:]) / np.float32(2)
    nibbles = order[np.searchsorted(bounds, scaled, side="left")]
    state = QuantState4bit(quant_type, blocksize, (int(w.shape[0]), int(w.shape[1])),
                           pack_nibbles(nibbles), absmax.astype(np.float32), None, dtype)
    if double_quant:
        if offset is None:
            threads = torch_threads or (sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1)
            offset = float(torch_mean_f32(state.absmax, threads))
        state.nested = quantize_nested_absmax(state.absmax, offset)
        state.absmax = dequantize_nested_absmax(state.nested)
    return state


def dequantize_4bit(state: QuantState4bit) -> np.ndarray:
    """``[out, in]`` float32 weights, equal to ``bitsandbytes.functional.dequantize_4bit`` on CPU."""
    _check_4bit(state.quant_type, state.blocksize, "dequantize_4bit")
    out, inp = state.shape
    n = out * inp
    if state.packed.size * 2 < n or state.absmax.size * state.blocksize < n:
        raise QuantizationError(
            f"quant state for shape {[out, inp]} holds {state.packed.size} packed bytes and "
            f"{state.absmax.size} absmax values; expected {(n + 1) // 2} and {-(-n // state.blocksize)}")
    values = state.code[unpack_nibbles(state.packed, n)]
    scale = np.repeat(np.asarray(state.absmax, np.float32), state.blocksize)[:n]
    return (values * scale).reshape(out, inp)


# ---------------------------------------------------------------- double quantization


def _cascade_rows(rows: np.ndarray) -> np.ndarray:
    """torch's ``multi_row_sum``: sums ``rows [size, ...]`` over axis 0 in float32 levels."""
    size = rows.shape[0]
    power = max(4, (int(size - 1).bit_length() if size > 2 else 1) // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((4,) + rows.shape[1:], np.float32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] += rows[i]
            i += 1
        for j in range(1, 4):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * power)):
                break
    for k in range(i, size):
        acc[0] += rows[k]
    for j in range(1, 4):
        acc[0] += acc[j]
    return acc[0]


def _torch_sum_f32(x: np.ndarray, lanes: int = 8) -> np.float32:
    """torch's single-threaded float32 sum of a contiguous vector: a cascade over 8-lane vectors
    (measured on AVX2 and AVX-512 builds alike), scalar tail first, then the lanes in order."""
    n_vec = x.size // lanes
    vectors = x[: n_vec * lanes].reshape(n_vec, lanes)
    n_ilp = n_vec // 4
    partial = _cascade_rows(vectors[: n_ilp * 4].reshape(n_ilp, 4, lanes)) if n_ilp else \
        np.zeros((4, lanes), np.float32)
    for k in range(n_ilp * 4, n_vec):
        partial[0] += vectors[k]
    for k in range(1, 4):
        partial[0] += partial[k]
    total = np.float32(0)
    for value in x[n_vec * lanes:]:
        total = np.float32(total + value)
    for value in partial[0]:
        total = np.float32(total + value)
    return total


def torch_mean_f32(x: np.ndarray, threads: int = 1) -> np.float32:
    """``torch.mean`` of a float32 vector on CPU, bit for bit, when torch runs ``threads``
    threads: above 32768 elements torch sums one contiguous chunk per thread, then the chunks."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    grain = 32768
    chunks = min(max(threads, 1), -(-x.size // grain)) if x.size > grain else 1
    size = -(-x.size // chunks)
    total = np.float32(0)
    for begin in range(0, x.size, size):
        total = np.float32(total + _torch_sum_f32(x[begin: begin + size]))
    return np.float32(total / np.float32(x.size))


_LUT_SIZE = 65536
_LUT_CACHE: dict[str, np.ndarray] = {}


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer does not search the code: it maps [-1, 1] onto 65536
    bins and looks up each bin's nearest code (by float32 midpoints), built once per code."""
    if "dynamic" not in _LUT_CACHE:
        code = DYNAMIC_CODE
        midpoints = np.float32(0.5) * (code[:-1] + code[1:])
        bins = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) \
            / np.float32(_LUT_SIZE - 1)
        _LUT_CACHE["dynamic"] = np.searchsorted(midpoints, bins, side="left").astype(np.uint8)
    return _LUT_CACHE["dynamic"]


def _lut_index(normed: np.ndarray) -> np.ndarray:
    """``uint16((clamp(x, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` in float32, as bitsandbytes rounds."""
    x = np.clip(normed, np.float32(-1), np.float32(1))
    return (((x + np.float32(1)) * np.float32(0.5)) * np.float32(_LUT_SIZE - 1)
            + np.float32(0.5)).astype(np.uint16)


def quantize_nested_absmax(absmax: np.ndarray, offset: float | None = None) -> dict:
    """Double-quantize ``absmax [n_blocks]``: ``absmax - offset`` with the 8-bit dynamic code in
    blocks of 256, as ``bitsandbytes.functional.quantize_blockwise`` does on CPU."""
    absmax = np.asarray(absmax, np.float32)
    offset32 = torch_mean_f32(absmax) if offset is None else np.float32(offset)  # see quantize_4bit
    centred = absmax - offset32
    n = centred.size
    pad = -n % NESTED_BLOCKSIZE
    blocks = np.concatenate([centred, np.zeros(pad, np.float32)]).reshape(-1, NESTED_BLOCKSIZE)
    nested_absmax = np.abs(blocks).max(axis=1)  # zero padding never raises a block's max
    with np.errstate(divide="ignore"):
        inverse = np.float32(1.0) / nested_absmax
    normed = (blocks * inverse[:, None]).reshape(-1)[:n]
    idx = _dynamic_lut()[_lut_index(normed)]
    idx[np.repeat(nested_absmax == 0, NESTED_BLOCKSIZE)[:n]] = 0
    return {"absmax": idx, "nested_absmax": nested_absmax.astype(np.float32),
            "nested_quant_map": DYNAMIC_CODE.copy(), "nested_offset": float(offset32),
            "nested_blocksize": NESTED_BLOCKSIZE}


def dequantize_nested_absmax(nested: dict) -> np.ndarray:
    """float32 ``[n_blocks]``: ``code[q] * nested_absmax[block] + offset`` (bitsandbytes' order)."""
    codes = np.asarray(nested["absmax"], np.uint8).reshape(-1)
    code = np.asarray(nested["nested_quant_map"], np.float32)
    block = int(nested.get("nested_blocksize", NESTED_BLOCKSIZE))
    scale = np.repeat(np.asarray(nested["nested_absmax"], np.float32), block)[: codes.size]
    return code[codes] * scale + np.float32(nested["nested_offset"])


# ---------------------------------------------------------------- bitsandbytes' stored form


def _numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (torch is only touched if x is one)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        torch = sys.modules["torch"]
        if x.dtype not in (torch.uint8, torch.int8, torch.float32, torch.float16):
            x = x.float() if x.is_floating_point() and x.element_size() == 2 else x
        return x.contiguous().numpy()
    return np.asarray(x)


def _packed_bytes(packed: Any) -> np.ndarray:
    """bitsandbytes stores codes as ``[n/2, 1]`` uint8 (or another ``quant_storage`` dtype)."""
    if hasattr(packed, "detach") and str(packed.dtype) != "torch.uint8":
        packed = packed.detach().cpu().contiguous().view(sys.modules["torch"].uint8)
    return np.ascontiguousarray(_numpy(packed)).view(np.uint8).reshape(-1)


def from_bnb_state(packed: Any, state: Any, *, name: str = "weight") -> QuantState4bit:
    """Read a bitsandbytes 4-bit weight: ``packed`` (``Params4bit.data``) plus either its
    ``QuantState`` or the serialized keys transformers saves (``<name>.absmax``,
    ``<name>.quant_map``, ``<name>.nested_absmax``, ``<name>.nested_quant_map``,
    ``<name>.quant_state.bitsandbytes__nf4``; prefixes are ignored)."""
    if isinstance(state, dict):
        fields = _bnb_dict_fields(state, name)
    else:
        fields = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                  "shape": tuple(state.shape), "absmax": state.absmax,
                  "dtype": str(state.dtype).replace("torch.", "")}
        if getattr(state, "nested", False):
            fields.update(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                          nested_offset=float(state.offset), nested_blocksize=state.state2.blocksize)
    if len(fields.get("shape") or ()) != 2:
        raise QuantizationError(f"{name}: 4-bit quant state has shape {fields.get('shape')}; expected [out, in]")
    quant_type, blocksize = fields["quant_type"], int(fields["blocksize"])
    _check_4bit(quant_type, blocksize, name)
    nested = None
    absmax = _numpy(fields["absmax"]).reshape(-1)
    if "nested_absmax" in fields:
        nested = {"absmax": absmax.astype(np.uint8),
                  "nested_absmax": _numpy(fields["nested_absmax"]).astype(np.float32).reshape(-1),
                  "nested_quant_map": _numpy(fields["nested_quant_map"]).astype(np.float32).reshape(-1),
                  "nested_offset": float(fields["nested_offset"]),
                  "nested_blocksize": int(fields.get("nested_blocksize", NESTED_BLOCKSIZE))}
        absmax = dequantize_nested_absmax(nested)
    shape = (int(fields["shape"][0]), int(fields["shape"][1]))
    result = QuantState4bit(quant_type, blocksize, shape, _packed_bytes(packed),
                            absmax.astype(np.float32), nested, str(fields.get("dtype", "float32")))
    n = shape[0] * shape[1]
    if result.packed.size != (n + 1) // 2 or result.absmax.size != -(-n // blocksize):
        raise QuantizationError(
            f"{name}: packed weight has {result.packed.size} bytes and {result.absmax.size} absmax "
            f"values, but its quant state says shape {list(shape)} / block size {blocksize}; the "
            "checkpoint's quant state does not belong to this weight")
    return result


def _bnb_dict_fields(state: dict, name: str) -> dict:
    fields = {key.rsplit(".", 1)[-1] if "quant_state." not in key else key.split("quant_state.")[-1]: value
              for key, value in state.items()}
    packed_keys = [k for k in fields if k.startswith("bitsandbytes__")]
    if packed_keys:
        fields.update(json.loads(bytes(_numpy(fields.pop(packed_keys[0])).astype(np.uint8)).decode("utf-8")))
    missing = [k for k in ("quant_type", "blocksize", "shape", "absmax") if k not in fields]
    if missing:
        raise QuantizationError(
            f"{name}: the 4-bit checkpoint's quant state is missing {', '.join(missing)} (expected "
            f"keys such as {name}.absmax and {name}.quant_state.bitsandbytes__nf4); re-save the "
            "model with transformers' save_pretrained so the quant state is stored")
    if "nested_absmax" in fields and "nested_offset" not in fields:
        raise QuantizationError(f"{name}: double-quantized state lacks nested_offset")
    return fields


def to_bnb_state_dict(state: QuantState4bit, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The tensors transformers saves for one ``Linear4bit`` weight, as numpy arrays."""
    out = {prefix: state.packed.reshape(-1, 1)}
    meta: dict[str, Any] = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                            "dtype": state.dtype, "shape": list(state.shape)}
    if state.nested is None:
        out[f"{prefix}.absmax"] = state.absmax
    else:
        out[f"{prefix}.absmax"] = state.nested["absmax"]
        out[f"{prefix}.nested_absmax"] = state.nested["nested_absmax"]
        out[f"{prefix}.nested_quant_map"] = state.nested["nested_quant_map"]
        meta.update(nested_blocksize=state.nested["nested_blocksize"], nested_dtype="float32",
                    nested_offset=state.nested["nested_offset"])
    out[f"{prefix}.quant_map"] = state.code.copy()
    out[f"{prefix}.quant_state.bitsandbytes__{state.quant_type}"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return out


# ---------------------------------------------------------------- LLM.int8


def quantize_int8(weight: np.ndarray, *, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """``weight [out, in]`` -> ``(CB int8 [out, in], SCB float32 [out])`` as bitsandbytes'
    ``int8_vectorwise_quant`` (threshold 0) stores a ``Linear8bitLt`` weight."""
    w = np.asarray(weight)
    if w.ndim != 2 or 0 in w.shape:
        raise QuantizationError(f"{name}: expected a 2-D weight [out, in], got shape {list(w.shape)}")
    w = w.astype(np.float32)
    scb = np.abs(w).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = w * ((np.float32(1) / scb) * np.float32(127))[:, None]  # torch rounds 127/SCB this way
    cb = np.round(np.nan_to_num(scaled, nan=0.0)).astype(np.int8)
    return cb, scb.astype(np.float32)


def dequantize_int8(cb: np.ndarray, scb: np.ndarray) -> np.ndarray:
    """``CB [out, in]``, ``SCB [out]`` -> float32 ``[out, in]``: ``CB * SCB * (1/127)``."""
    cb, scb = np.asarray(cb), np.asarray(scb, np.float32).reshape(-1)
    if cb.ndim != 2 or cb.shape[0] != scb.size:
        raise QuantizationError(
            f"int8 weight of shape {list(cb.shape)} needs one SCB scale per row, got {scb.size}")
    return (cb.astype(np.float32) * scb[:, None]) * np.float32(7.874015718698502e-3)
