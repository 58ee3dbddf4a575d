"""Mutations of an ONNX model file: metadata JSON, external data locations, initializers, bytes.

``mutate_model(rng, path, secret)`` rewrites ``path`` (and maybe ``<path>.data``, a symlink or
hard link beside it) and returns ``(label, must_refuse)``. ``must_refuse`` marks a model whose
external data escapes its folder (``..``, absolute, symlink, hard link, in a function): such a
model must be refused, never read or re-emitted. ``secret`` is a file outside the model folder.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import onnx
from fuzz_files import damage_bytes
from fuzz_json import mutate_json
from onnx import TensorProto, helper

METADATA_KEYS = ["onnx_peft.contract", "onnx_peft.multi_adapter", "onnx_peft.prompt", "onnx_peft.fingerprint"]
HOT_KEYS = ["slots", "banks", "shape", "dims", "dtype", "name", "module", "default", "fingerprint", "kind", "slot",
            "bank", "method"]


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _externalize(model: onnx.ModelProto, path: Path) -> list[TensorProto]:
    """Move the big float initializers into ``<path>.data`` (a valid model); return them."""
    moved, chunks, offset = [], [], 0
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and len(tensor.raw_data) >= 256:
            raw = tensor.raw_data
            _set_external(tensor, path.name + ".data", offset, len(raw))
            chunks.append(raw)
            offset += len(raw)
            moved.append(tensor)
    (path.parent / (path.name + ".data")).write_bytes(b"".join(chunks))
    return moved


def _function_constant(model: onnx.ModelProto, location: str, call: bool) -> None:
    """A model-local function whose Constant reads external data at ``location``."""
    value = helper.make_tensor("secret", TensorProto.FLOAT, [4], [0.0] * 4)
    _set_external(value, location, 0, 16)
    const = helper.make_node("Constant", [], ["c"], value=value)
    function = helper.make_function("fuzz.local", "Leak", [], ["c"], [const],
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    if not any(o.domain == "fuzz.local" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("fuzz.local", 1))
    if call:
        model.graph.node.append(helper.make_node("Leak", [], ["fuzz_leak"], domain="fuzz.local"))
        model.graph.output.append(helper.make_tensor_value_info("fuzz_leak", TensorProto.FLOAT, [4]))


def mutate_model(rng: random.Random, path: Path, secret: Path) -> tuple[str, bool]:
    data = path.read_bytes()
    action = rng.randrange(9)
    if action == 0:
        out, label = damage_bytes(rng, data)
        path.write_bytes(out)
        return "onnx-" + label, False
    model = onnx.load_from_string(data)
    must_refuse = False
    if action in (1, 2):  # contract / multi-adapter / prompt metadata
        props = {p.key: p for p in model.metadata_props}
        key = rng.choice([k for k in METADATA_KEYS if k in props] or METADATA_KEYS) if action == 1 \
            else rng.choice(METADATA_KEYS)
        if key not in props:
            props[key] = model.metadata_props.add()
            props[key].key, props[key].value = key, '{"slots": [], "banks": [], "fingerprint": "x"}'
        if rng.random() < 0.1:
            model.metadata_props.remove(props[key])
        else:
            props[key].value = mutate_json(rng, props[key].value, hot_keys=HOT_KEYS)
        label = "meta-" + key.split(".")[-1]
    elif action == 3:  # initializer shape / dtype lies
        tensor = rng.choice(list(model.graph.initializer))
        if rng.random() < 0.5:
            dims = list(tensor.dims)
            del tensor.dims[:]
            tensor.dims.extend(rng.choice([dims[::-1], dims + [2], [2**40], [0], [-1], dims[:-1] or [3]]))
            label = "init-shape"
        else:
            tensor.data_type = rng.choice([TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64,
                                           TensorProto.STRING, TensorProto.BFLOAT16, 99])
            label = "init-dtype"
    elif action == 4:  # an initializer dropped or duplicated
        tensor = rng.choice(list(model.graph.initializer))
        if rng.random() < 0.5:
            model.graph.initializer.remove(tensor)
            label = "init-missing"
        else:
            model.graph.initializer.append(tensor)
            label = "init-duplicate"
    elif action == 5:  # valid external data, then maybe a lie about it
        moved = _externalize(model, path)
        label = "ext-valid"
        if moved and rng.random() < 0.8:
            tensor = rng.choice(moved)
            info = {e.key: e.value for e in tensor.external_data}
            lie = rng.randrange(9)
            if lie == 0:
                location, label, must_refuse = "../" + secret.name, "ext-dotdot", True
            elif lie == 1:
                location, label, must_refuse = str(secret), "ext-absolute", True
            elif lie == 2:
                link = path.parent / "link.data"
                os.symlink(secret, link)
                location, label, must_refuse = link.name, "ext-symlink", True
            elif lie == 3:
                link = path.parent / "hard.data"
                os.link(secret, link)
                location, label, must_refuse = link.name, "ext-hardlink", True
            elif lie == 4:
                location, label = rng.choice(["missing.data", "", ".", "a\x00b", "sub/../" + path.name + ".data"]), \
                    "ext-odd-location"
            else:
                location = info["location"]
                offset, length = int(info["offset"]), int(info["length"])
                offset, length = rng.choice([(offset + 4, length), (offset, length + 4), (2**40, length),
                                             (offset, 2**40), (-4, length), (offset, 0)])
                label = "ext-range"
            _set_external(tensor, location, *((offset, length) if lie >= 5 else
                                               (0, min(int(info["length"]), secret.stat().st_size))))
    elif action == 6:  # a function-local Constant pointing outside the folder
        _function_constant(model, rng.choice(["../" + secret.name, str(secret)]), call=rng.random() < 0.5)
        label, must_refuse = "fn-constant-escape", True
    elif action == 7:  # inputs renamed or dropped (slot inputs, ids input)
        inputs = list(model.graph.input)
        victim = rng.choice(inputs)
        if rng.random() < 0.5:
            model.graph.input.remove(victim)
        else:
            victim.type.tensor_type.elem_type = rng.choice([TensorProto.FLOAT16, TensorProto.INT32,
                                                            TensorProto.DOUBLE])
        label = "graph-inputs"
    else:  # a serialized model cut short after being re-encoded
        out = model.SerializeToString()
        path.write_bytes(out[: rng.randrange(len(out))])
        return "onnx-truncate", False
    path.write_bytes(model.SerializeToString())
    return label, must_refuse
