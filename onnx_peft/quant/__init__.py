"""Quantized base weights for QLoRA: bitsandbytes-compatible NF4/FP4/int8 formats (numpy, in
:mod:`onnx_peft.quant.formats`) and the torch layers built on them."""
