"""onnx-peft: parameter-efficient adapters from PyTorch training to ONNX Runtime deployment.

Importing this package does not import torch; torch features load on first use and say
``pip install onnx-peft[torch]`` when PyTorch is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import AdapterConfig
from .errors import OnnxPeftError
from .export import export  # eager: the function must shadow the submodule of the same name
from .methods.lora import LoraConfig, LoraRuntimeConfig

__version__ = "0.1.0"

# public name -> (module, needs torch)
_LAZY: dict[str, tuple[str, bool]] = {
    "get_peft_model": ("onnx_peft.model", True),
    "PeftModel": ("onnx_peft.model", True),
    "AdapterSession": ("onnx_peft.runtime", False),
    "merge_adapters": ("onnx_peft.passes.merge_adapters", False),
    "extract_adapters": ("onnx_peft.passes.extract_adapters", False),
    "insert_adapters": ("onnx_peft.passes.insert_adapters", False),
    "multi_adapter": ("onnx_peft.passes.multi_adapter", False),
    "convert_adapters": ("onnx_peft.convert", False),
    "train": ("onnx_peft.training", True),
    "quantize_model": ("onnx_peft.quant.layers", True),
    "prepare_model_for_kbit_training": ("onnx_peft.quant.layers", True),
    "LoftQConfig": ("onnx_peft.quant.loftq", True),
    "replace_lora_weights_loftq": ("onnx_peft.quant.loftq", True),
    "create_loraplus_optimizer": ("onnx_peft.optimizers.loraplus", True),
    "create_lorafa_optimizer": ("onnx_peft.optimizers.lorafa", True),
    "LoraFAOptimizer": ("onnx_peft.optimizers.lorafa", True),
    "EvaConfig": ("onnx_peft.tuners.lora_init.eva", True),
    "get_eva_state_dict": ("onnx_peft.tuners.lora_init.eva", True),
    "initialize_lora_eva_weights": ("onnx_peft.tuners.lora_init.eva", True),
    "CordaConfig": ("onnx_peft.tuners.lora_init.corda", True),
    "preprocess_corda": ("onnx_peft.tuners.lora_init.corda", True),
    "LoraGAConfig": ("onnx_peft.tuners.lora_init.loraga", True),
    "preprocess_loraga": ("onnx_peft.tuners.lora_init.loraga", True),
}

__all__ = ["AdapterConfig", "LoraConfig", "LoraRuntimeConfig", "OnnxPeftError", "export", *_LAZY]


def __getattr__(name: str) -> Any:
    if name.endswith("Config") and name not in _LAZY:  # every method's config: IA3Config, LoHaConfig...
        from .methods import config_classes

        found = config_classes().get(name)
        if found is not None:
            globals()[name] = found
            return found
    if name not in _LAZY:
        raise AttributeError(f"module 'onnx_peft' has no attribute {name!r}")
    module_name, needs_torch = _LAZY[name]
    if needs_torch:
        from .errors import require_torch

        require_torch()
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
