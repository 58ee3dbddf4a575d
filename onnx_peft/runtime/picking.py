"""The next-token step of a decode loop, run by ONNX Runtime where the logits are.

A causal LM's logits are ``[batch, seq, vocab]``: at a 512-token prefill with a 32k vocab that is
65 MB of fp32 to copy to the host for one argmax per row. The picker is a tiny graph run on the
session's device right after the model, so only what the loop needs crosses to the host::

    logits [batch, seq, vocab] --Gather(seq = -1)--> [batch, vocab]
        --Cast float32--> last_logits [batch, vocab]   sampling: the host samples (seeded numpy RNG)
        --ArgMax--> next_ids [batch] int64              greedy: 8 bytes a row, the first maximum as numpy
"""

from __future__ import annotations

from typing import Any

import numpy as np


def picker_model(logits_dtype: np.dtype) -> bytes:
    """The picker graph for logits of ``logits_dtype``."""
    import onnx_ir as ir

    dtype = ir.DataType.from_numpy(np.dtype(logits_dtype))
    logits = ir.Value(name="logits", type=ir.TensorType(dtype), shape=ir.Shape(["batch", "seq", "vocab"]))
    last_index = ir.Value(name="last", const_value=ir.tensor(np.array(-1, np.int64), name="last"))
    last = ir.node("Gather", [logits, last_index], {"axis": 1}, name="pick/last")
    as_float = ir.node("Cast", [last.outputs[0]], {"to": int(ir.DataType.FLOAT)}, name="pick/float")
    ids = ir.node("ArgMax", [as_float.outputs[0]], {"axis": -1, "keepdims": 0}, name="pick/argmax")  # first max
    ids.outputs[0].name, as_float.outputs[0].name = "next_ids", "last_logits"
    ids.outputs[0].type, ids.outputs[0].shape = ir.TensorType(ir.DataType.INT64), ir.Shape(["batch"])
    as_float.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    as_float.outputs[0].shape = ir.Shape(["batch", "vocab"])
    graph = ir.Graph([logits], [ids.outputs[0], as_float.outputs[0]], nodes=[last, as_float, ids],
                     initializers=[last_index], opset_imports={"": 17}, name="onnx_peft_picker")
    return ir.serde.serialize_model(ir.Model(graph, ir_version=9)).SerializeToString()


class Picker:
    """Runs the picker on the model's device; ``pick`` returns host arrays."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def pick(self, logits: Any, greedy: bool) -> np.ndarray:
        """``next_ids [batch]`` (greedy) or ``last_logits [batch, vocab]`` float32, on the host.
        ``logits``: an OrtValue on the device, or a host array."""
        name = "next_ids" if greedy else "last_logits"
        binding = self._session.io_binding()
        if isinstance(logits, np.ndarray):
            binding.bind_cpu_input("logits", np.ascontiguousarray(logits))
        else:
            binding.bind_ortvalue_input("logits", logits)
        binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
