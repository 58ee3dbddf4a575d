"""Byte- and structure-level mutations of adapter files: .safetensors, .npz, .onnx_adapter.

Each ``mutate_<format>(rng, path)`` rewrites ``path`` in place with one hostile variant and
returns a short label of what it did (for the report). Tensor-level lies (dtype, shape, byte
order, NaN values, renamed or missing tensors) are written with numpy / ORT directly, never
through onnx_peft's writers, so they reach the readers exactly as a hostile file would.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
from fuzz_json import mutate_json, nasty_value

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X",
             "f32", 1, None]


# -- generic bytes ----------------------------------------------------------------------------
def damage_bytes(rng: random.Random, data: bytes, start: int = 0) -> tuple[bytes, str]:
    """Truncate, flip bits, zero or splice a range, append garbage (from ``start`` on)."""
    action = rng.randrange(5)
    end = len(data)
    if action == 0 or end <= start:
        return data[: rng.randrange(max(end, 1))], "truncate"
    if action == 1:
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            at = rng.randrange(start, end)
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), "bitflip"
    if action == 2:
        at = rng.randrange(start, end)
        size = rng.choice([1, 4, 16, 256])
        fill = rng.choice([b"\x00", b"\xff", b"\x7f"])
        return data[:at] + fill * size + data[at + size:], "overwrite"
    if action == 3:
        return data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100]))), "append"
    at = rng.randrange(start, end)
    return data[:at] + data[at + rng.randrange(1, 64):], "cut"


# -- tensor dict lies (any format) -------------------------------------------------------------
def lie_about_tensors(rng: random.Random, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """A valid file with the wrong content: dtype, shape, byte order, values, names."""
    names = sorted(tensors)
    name = rng.choice(names)
    array = tensors[name]
    action = rng.randrange(10)
    if action == 0:
        tensors[name] = array.astype(rng.choice([np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]))
        return tensors, "dtype"
    if action == 1:
        tensors[name] = rng.choice([array.T.copy(), array.reshape(-1), array[None], array[:, :1] if array.ndim == 2
                                    else array, np.zeros((0,) + array.shape[1:], array.dtype),
                                    np.zeros((array.shape[0] * 2,) + array.shape[1:], array.dtype)])
        return tensors, "shape"
    if action == 2:
        tensors[name] = array.astype(array.dtype.newbyteorder(">"))  # valid, same values
        return tensors, "big-endian"
    if action == 3:
        bad = array.astype(np.float32, copy=True)
        bad.flat[rng.randrange(bad.size)] = rng.choice([np.nan, np.inf, -np.inf])
        tensors[name] = bad
        return tensors, "non-finite"
    if action == 4:
        tensors[name] = (array * rng.choice([1e30, 3e38, 1e-45])).astype(array.dtype)
        return tensors, "huge-values"
    if action == 5:
        del tensors[name]
        return tensors, "missing"
    if action == 6:
        tensors[rng.choice([name + ".extra", "base_model.model.x.lora_A.weight", "lm_head.weight", "", "../x"])] = array
        return tensors, "extra"
    if action == 7:
        tensors[name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")] = array
        return tensors, "swapped"
    if action == 8:
        return {}, "empty"
    tensors[name] = np.array(["text"] * max(1, array.size)).reshape(-1) if rng.random() < 0.5 \
        else np.zeros(array.shape, dtype=np.complex64)
    return tensors, "odd-dtype"


# -- safetensors ------------------------------------------------------------------------------
def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + size]), data[8 + size:]


def _join_safetensors(header: dict | str, body: bytes, size_lie: int | None = None) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text) if size_lie is None else size_lie) + text + body


def mutate_safetensors(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    header, body = _split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    action = rng.randrange(12)
    label = "header"
    if action == 0:
        entry["dtype"] = rng.choice(ST_DTYPES)
        label = "st-dtype"
    elif action == 1:
        entry["shape"] = rng.choice([[], [0], [-1], [2**40], [2**62, 2**62], [4.5], "x", None, entry["shape"][::-1],
                                     entry["shape"] + [1], [int(np.prod(entry["shape"]))], [{"a": 1}]])
        label = "st-shape"
    elif action == 2:
        start, end = entry["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, len(body) + 4], [-4, end], [start + 1, end + 1],
                                            list(other), [0, 0], [start, end - 4], [float(start), end], "0-4",
                                            [start], [start, end, 0], [2**64, 2**64 + 4]])
        label = "st-offsets"
    elif action == 3:
        del header[name]
        label = "st-missing"
    elif action == 4:
        header[rng.choice(["base_model.model.x.lora_A.weight", name + "x", "", name.replace("lora_A", "lora_E")])] = \
            dict(entry)
        label = "st-extra"
    elif action == 5:
        meta = header.setdefault("__metadata__", {})
        meta[rng.choice(["format", "onnx_peft.fingerprint", "x"])] = nasty_value(rng)
        if rng.random() < 0.3:
            header["__metadata__"] = nasty_value(rng)
        label = "st-metadata"
    elif action == 6:
        header = mutate_json(rng, json.dumps(header), hot_keys=["dtype", "shape", "data_offsets"], garble=0.3)
        label = "st-json"
    elif action == 7:
        size = len(json.dumps(header).encode())
        path.write_bytes(_join_safetensors(header, body, rng.choice([0, 1, size - 1, size + 1, 2**40, 2**64 - 1,
                                                                     len(data)])))
        return "st-size-lie"
    elif action == 8:  # many entries: header size caps, per-entry cost
        count = rng.choice([1000, 20000, 200000])
        for i in range(count):
            header[f"t{i}"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        label = "st-many-entries"
    elif action == 9:
        header = {"__metadata__": header.get("__metadata__", {})} if rng.random() < 0.5 else {}
        label = "st-no-tensors"
    elif action == 10:
        out, label = damage_bytes(rng, data, start=rng.choice([0, 8, 8 + len(data) - len(body)]))
        path.write_bytes(out)
        return "st-" + label
    else:
        from onnx_peft.checkpoint import read_safetensors  # the unmutated seed file reads fine

        tensors, meta = read_safetensors(path)
        tensors, label = lie_about_tensors(rng, tensors)
        path.write_bytes(_raw_safetensors(tensors, meta))
        return "st-" + label
    path.write_bytes(_join_safetensors(header, body))
    return label


_ST_NAMES = {"float32": "F32", "float16": "F16", "float64": "F64", "int32": "I32", "int64": "I64", "uint8": "U8",
             "bool": "BOOL", "complex64": "C64"}


def _raw_safetensors(tensors: dict[str, np.ndarray], meta: dict) -> bytes:
    """safetensors bytes written by hand: big-endian and odd dtypes go in as they are."""
    header, chunks, offset = {"__metadata__": meta} if meta else {}, [], 0
    for name, array in tensors.items():
        raw = array.tobytes()
        header[name] = {"dtype": _ST_NAMES.get(array.dtype.name, "U8"), "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return _join_safetensors(header, b"".join(chunks))


# -- npz --------------------------------------------------------------------------------------
def _npz_bytes(members: dict[str, bytes], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npy_header_lie(array: np.ndarray, shape: tuple, descr: str) -> bytes:
    """An .npy member whose header claims ``shape``/``descr`` in front of ``array``'s bytes."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + array.tobytes()


class _Boom:
    """A pickle that would create a marker file if anything unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def mutate_npz(rng: random.Random, path: Path, marker: Path) -> str:
    data = path.read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    names = sorted(k for k in arrays if arrays[k].dtype.kind == "f")
    name = rng.choice(names)
    action = rng.randrange(9)
    members = {k + ".npy": _npy(v) for k, v in arrays.items()}
    if action == 0:
        out, label = damage_bytes(rng, data)
        path.write_bytes(out)
        return "npz-" + label
    if action == 1:
        arrays, label = lie_about_tensors(rng, {k: v for k, v in arrays.items()})
        members = {k + ".npy": _npy(v) for k, v in arrays.items()}
        label = "npz-" + label
    elif action == 2:  # header lies: huge shape over a small body, wrong descr, fortran order
        array = arrays[name]
        shape = rng.choice([(2**30,), (2**20, 2**20), (0,), array.shape[::-1], (array.size + 1,), (-1,)])
        descr = rng.choice(["<f4", ">f4", "<f8", "|u1", "<U8", "|O", "<c8", "<f2"])
        try:
            members[name + ".npy"] = _npy_header_lie(array, shape, descr)
        except ValueError:
            members[name + ".npy"] = _npy_header_lie(array, (2**30,), "<f4")
        label = "npz-header-lie"
    elif action == 3:  # a deflated bomb: 64 MB of zeros under a header that claims it
        zeros = np.zeros(rng.choice([2**24, 2**26]) // 4, np.float32)
        members[name + ".npy"] = _npy(zeros)
        path.write_bytes(_npz_bytes(members, compress=True))
        return "npz-bomb"
    elif action == 4:  # a pickled object member that would run code
        members[name + ".npy"] = _npy(np.array([_Boom(str(marker))], dtype=object))
        label = "npz-pickle"
    elif action == 5:
        members[rng.choice(["x.txt", name, "../evil.npy", "dir/", "x.npy"])] = rng.choice(
            [b"not npy", b"\x93NUMPY\x01\x00", pickle.dumps([1, 2]), b""])
        label = "npz-odd-member"
    elif action == 6:
        fingerprint = "__onnx_peft_fingerprint__.npy"
        members[fingerprint] = rng.choice([_npy(np.array([1, 2])), _npy(np.array("x" * 100)), b"garbage",
                                           _npy(np.array(3.5)), _npy(np.array(["a", "b"]))])
        label = "npz-fingerprint"
    elif action == 7:  # a member stored twice
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, raw in members.items():
                archive.writestr(member, raw)
            archive.writestr(name + ".npy", _npy(np.zeros((3, 3), np.float32)))
        path.write_bytes(buffer.getvalue())
        return "npz-duplicate"
    else:
        members = {k: v for k, v in members.items() if rng.random() < 0.5}
        label = "npz-subset"
    path.write_bytes(_npz_bytes(members, compress=rng.random() < 0.5))
    return label


# -- .onnx_adapter ----------------------------------------------------------------------------
def _write_onnx_adapter(path: Path, tensors: dict[str, np.ndarray], version: int) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(version)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    adapter.export_adapter(str(path))


def mutate_onnx_adapter(rng: random.Random, path: Path) -> str:
    import onnxruntime as ort

    if rng.random() < 0.55:
        out, label = damage_bytes(rng, path.read_bytes())
        path.write_bytes(out)
        return "oa-" + label
    adapter = ort.AdapterFormat.read_adapter(str(path))
    tensors = {k: np.array(v.numpy()) for k, v in adapter.get_parameters().items()}
    version = int(adapter.get_model_version())
    if rng.random() < 0.2:
        version = rng.choice([0, 1, 2**31 - 1, version ^ 1])
        label = "oa-fingerprint"
    else:
        tensors, label = lie_about_tensors(rng, tensors)
        tensors = {k: v for k, v in tensors.items() if v.dtype.kind in "fiub"}  # ORT takes numeric tensors only
        label = "oa-" + label
    try:
        _write_onnx_adapter(path, tensors, version)
    except Exception:  # ORT would not write it: damage the original bytes instead
        out, _ = damage_bytes(rng, path.read_bytes())
        path.write_bytes(out)
    return label
