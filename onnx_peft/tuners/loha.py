"""LoHa layers for nn.Linear and nn.Conv1d/2d (the shared layer is tuners/lycoris.py)::

    dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)      w*_a [out, r], w*_b [r, in * prod(k)]
    y  = base(x) + x dW^T                        (conv: conv(x, dW) with the base's stride...)

With ``use_effective_conv2d`` a kernel larger than 1 keeps CP cores ``hada_t1/t2 [r, r, k1, k2]``
and ``w*_a [r, out]``, ``w*_b [r, in]``. Tensor names and shapes are PEFT's, so checkpoints
move both ways.
"""

from __future__ import annotations

import math

from torch import nn

from ..methods.loha import LoHaConfig
from .lycoris import LycorisLayer, make_lycoris_layer


class LoHaLayer(LycorisLayer):
    """LoHa on a Linear or Conv1d/2d ``base_layer``."""

    peft_type = "LOHA"
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def factor_shapes(self, r, config, effective_conv):
        out, inp = self.out_features, self.in_features
        if effective_conv:
            core = self.core_shape(r)
            return {"hada_w1_a": (r, out), "hada_w1_b": (r, inp), "hada_t1": core,
                    "hada_w2_a": (r, out), "hada_w2_b": (r, inp), "hada_t2": core}
        flat_in = inp * math.prod(self.kernel_size)
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat_in), "hada_w2_a": (out, r), "hada_w2_b": (r, flat_in)}

    def zero_init_factor(self, adapter_name, init_weights):
        return "hada_w2_b" if init_weights else None


def make_layer(module: nn.Module, adapter_name: str, config: LoHaConfig, module_path: str) -> LoHaLayer:
    """Wrap ``module`` (nn.Linear, nn.Conv1d, nn.Conv2d) and create ``adapter_name`` on it."""
    return make_lycoris_layer(LoHaLayer, module, adapter_name, config, module_path)


def add_adapter(layer: LoHaLayer, adapter_name: str, config: LoHaConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config, module_path)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = LoHaLayer
