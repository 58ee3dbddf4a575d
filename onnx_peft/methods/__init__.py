"""Torch-free definition of each adapter method: its config and its delta-weight math.

The PyTorch layers (``onnx_peft.tuners``) and the ONNX passes (``onnx_peft.passes``) both
call these functions, so each method's math exists once. Every function works on numpy
arrays and on torch tensors alike.
"""

from .lora import LoraConfig  # noqa: F401  (registers LORA)
