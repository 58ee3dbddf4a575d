"""Torch-free definition of each adapter method: config, PEFT keys, math, slots (see base.py).

The PyTorch layers (``onnx_peft.tuners``) and the ONNX passes (``onnx_peft.passes``) both
call these, so each method's math exists once. Adding a method = one file here (registered
with ``@register_method``) + one under ``tuners/``; every module of this package except the
seam itself (``base``, ``forms``) is a method and is found without being listed.
"""

import importlib
import pkgutil

from .lora import LoraConfig  # noqa: F401  (registers LORA)

_SEAM = {"base", "forms"}
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SEAM and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def config_classes() -> dict[str, type]:
    """Every method's config class by its class name (``IA3Config``, ``LoraConfig``, ...)."""
    from .base import all_methods

    return {m.config_class.__name__: m.config_class for m in all_methods().values()}
