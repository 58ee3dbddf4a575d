"""Adapter configs: dataclasses whose fields are PEFT's ``adapter_config.json`` names.

Configs are torch-free so that graph passes, convert-adapters and the runtime can read an
adapter directory on a box without PyTorch. Fields a PEFT version writes that we do not model
are kept in ``extra`` and written back unchanged, so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import AdapterConfigError

CONFIG_NAME = "adapter_config.json"

# peft_type -> config class; filled by @register_config in each method module.
_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}

# PEFT fields that change the math when set to something other than these values; we refuse
# them rather than silently computing something else.
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "megatron_config": None,
}


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``cls`` loadable by its ``peft_type``."""
    _CONFIG_CLASSES[cls.peft_type] = cls
    return cls


def config_class(peft_type: str) -> type[AdapterConfig]:
    _load_method_modules()
    try:
        return _CONFIG_CLASSES[peft_type]
    except KeyError:
        known = ", ".join(sorted(_CONFIG_CLASSES))
        raise AdapterConfigError(
            f"unknown peft_type {peft_type!r}; onnx-peft supports: {known}"
        ) from None


def _load_method_modules() -> None:
    from .methods import _load_all

    _load_all()  # registers every method's config


@dataclass
class AdapterConfig:
    """Fields every PEFT adapter config has."""

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            value = getattr(self, name, None)
            if isinstance(value, (set, tuple)):  # PEFT writes module lists as JSON lists
                setattr(self, name, sorted(value))
        self.validate()

    def validate(self) -> None:
        """Check field values; raise AdapterConfigError naming the field."""

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AdapterConfig:
        """Build the config class named by ``data["peft_type"]`` (or ``cls`` itself)."""
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.peft_type
        if not peft_type:
            raise AdapterConfigError(f"{source}: missing 'peft_type'; is this a PEFT adapter config?")
        target = config_class(str(peft_type).upper())
        if cls.peft_type and not issubclass(target, cls):
            raise AdapterConfigError(f"{source}: peft_type {peft_type!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        for key, neutral in _UNSUPPORTED_IF_SET.items():
            if extra.get(key, neutral) not in (neutral, None, False, [], {}):
                raise AdapterConfigError(
                    f"{source}: field {key}={extra[key]!r} is not supported by onnx-peft; "
                    "retrain without it or merge the adapter with PEFT first"
                )
        try:
            return target(**known, extra=extra)
        except TypeError as exc:
            raise AdapterConfigError(f"{source}: {exc}") from exc

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AdapterConfig:
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise AdapterConfigError(f"{path}: no adapter config found; expected a PEFT adapter directory")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))
