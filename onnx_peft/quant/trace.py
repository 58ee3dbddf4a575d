"""Export a model whose base is 4/8-bit (QLoRA) with the exact codes it was trained on.

The ONNX exporter cannot trace bitsandbytes' (or our) packed layers, so while the model is traced
each quantized base Linear stands in as a float ``nn.Linear`` holding its dequantized weight
(the very values its forward multiplies by); :func:`float_bases` yields their 4-bit states, and
``QuantizeBase.from_states`` then writes those codes into the graph as ``MatMulBnb4``: the ONNX
base dequantizes to bit-identical weights, with no second quantization. 8-bit bases have no
ONNX Runtime contrib op with the same format; they export as their dequantized float weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..graph.modules import normalize_module_path
from .formats import QuantState4bit
from .layers import dequantized_weight, is_quantized_linear, linear_features, quant_state

log = logging.getLogger(__name__)


@contextlib.contextmanager
def float_bases(model: nn.Module) -> Iterator[dict[str, QuantState4bit]]:
    """Swap every quantized linear of ``model`` for a float copy (restored on exit); yield
    ``{module path: QuantState4bit}`` of the 4-bit ones (paths as in ``named_modules``)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    states: dict[str, QuantState4bit] = {}
    eight_bit = []
    try:
        for path, module in list(model.named_modules()):
            if not path or not is_quantized_linear(module):
                continue
            in_features, out_features = linear_features(module)
            bias = getattr(module, "bias", None)
            linear = nn.Linear(in_features, out_features, bias=bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantized_weight(module))
                if bias is not None:
                    linear.bias.copy_(bias.float())
            try:  # keyed like the graph's module paths (a LoRA layer's ".base_layer" dropped)
                states[normalize_module_path(path)] = quant_state(module)
            except Exception:  # an 8-bit base: no 4-bit state, exported as float
                eight_bit.append(path)
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            parent._modules[name] = linear
            swapped.append((parent, name, module))
        if eight_bit:
            log.info("%d 8-bit layers export as their dequantized float weights (e.g. %s)", len(eight_bit),
                     eight_bit[0])
        yield states
    finally:
        for parent, name, module in reversed(swapped):
            parent._modules[name] = module
