"""LoKr layers for nn.Linear and nn.Conv1d/2d (the shared layer is tuners/lycoris.py)::

    out = a * b, in = c * d                      (factorization(dim, decompose_factor))
    dW = s * kron(w1 [a, c], w2 [b, d])          y = base(x) + x dW^T  (conv: conv(x, dW))

``w1`` is one tensor unless ``decompose_both`` and ``r < max(a, c) / 2`` split it into
``w1_a [a, r] @ w1_b [r, c]``; ``w2`` splits into ``w2_a [b, r] @ w2_b [r, d * prod(k)]`` when
``r < max(b, d) / 2`` (a conv with ``use_effective_conv2d``: CP core ``t2 [r, r, k1, k2]``,
``w2_a [r, b]``, ``w2_b [r, d]``). Tensor names and shapes are PEFT's.
"""

from __future__ import annotations

import math

from torch import nn

from ..methods.lokr import LoKrConfig, factorization
from .lycoris import LycorisLayer, make_lycoris_layer


class LoKrLayer(LycorisLayer):
    """LoKr on a Linear or Conv1d/2d ``base_layer``."""

    peft_type = "LOKR"
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def factor_shapes(self, r, config, effective_conv):
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(self.in_features, config.decompose_factor)
        shapes: dict[str, tuple[int, ...]] = {}
        if config.decompose_both and r < max(a, c) / 2:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            shapes.update(lokr_w1=(a, c))
        if r >= max(b, d) / 2:
            shapes.update(lokr_w2=(b, d, *self.kernel_size))
        elif effective_conv:
            shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=self.core_shape(r))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(self.kernel_size)))
        return shapes

    def zero_init_factor(self, adapter_name, init_weights):
        if init_weights == "lycoris":  # LyCORIS zeroes the second factor
            return "lokr_w2" if adapter_name in self.lokr_w2 else "lokr_w2_b"
        if init_weights:
            return "lokr_w1" if adapter_name in self.lokr_w1 else "lokr_w1_a"
        return None


def make_layer(module: nn.Module, adapter_name: str, config: LoKrConfig, module_path: str) -> LoKrLayer:
    """Wrap ``module`` (nn.Linear, nn.Conv1d, nn.Conv2d) and create ``adapter_name`` on it."""
    return make_lycoris_layer(LoKrLayer, module, adapter_name, config, module_path)


def add_adapter(layer: LoKrLayer, adapter_name: str, config: LoKrConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config, module_path)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = LoKrLayer
