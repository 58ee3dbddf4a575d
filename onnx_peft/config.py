"""Adapter configs: dataclasses whose fields are PEFT's ``adapter_config.json`` names.

Configs are torch-free so that graph passes, convert-adapters and the runtime can read an
adapter directory on a box without PyTorch. Fields a PEFT version writes that we do not model
are kept in ``extra`` and written back unchanged, so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import AdapterConfigError

CONFIG_NAME = "adapter_config.json"
# adapter_config.json files are a few KB; a bigger one is not a config (and json.loads of it is slow)
MAX_CONFIG_BYTES = 16 * 2**20
# |alpha| above this overflows fp16 outputs and is far beyond any trained adapter (PEFT uses 8..1024)
MAX_SCALE = 1e6
_FLOAT32_MAX = 3.4028234663852886e38
# fields whose string (or list entries / dict keys) are regexes matched against module paths
_PATTERN_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "layers_pattern", "modules_to_save",
                   "rank_pattern", "alpha_pattern", "n_frequency_pattern")

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
        try:  # the method's own checks first: their messages are the most specific
            self.validate()
        except AdapterConfigError:
            raise
        except Exception as exc:  # validate() tripped over a wrongly typed value: say which field
            check_field_types(self)
            raise AdapterConfigError(f"{type(self).__name__}: invalid field value ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from exc
        check_field_types(self)  # then what PEFT's annotations allow, for every field
        check_field_patterns(self)

    def validate(self) -> None:
        """Check field values; raise AdapterConfigError naming the field."""

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra" or not f.metadata.get("saved", True):  # run-time only (LoRA's runtime_config)
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
        if not isinstance(peft_type, str):
            raise AdapterConfigError(f"{source}: 'peft_type' must be a string such as \"LORA\", got {peft_type!r:.60}")
        try:
            target = config_class(peft_type.upper())
        except AdapterConfigError as exc:
            raise AdapterConfigError(f"{source}: {exc}") from None
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
        except AdapterConfigError as exc:
            raise AdapterConfigError(f"{source}: {exc}") from exc
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a validate() tripped on a wrong type
            raise AdapterConfigError(f"{source}: invalid field value ({type(exc).__name__}: {exc})") from exc

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
            size = path.stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise AdapterConfigError(f"{path}: {size} bytes is too large for an adapter config "
                                         f"(limit {MAX_CONFIG_BYTES}); is this the right file?")
            data = json.loads(path.read_bytes())
        except OSError as exc:
            raise AdapterConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise AdapterConfigError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))


# -- field checks shared by every config ---------------------------------------------------------
def check_field_types(config: AdapterConfig) -> None:
    """Refuse values PEFT's dataclass annotations do not allow, naming the field.

    JSON gives ``true`` for an int, ``"no"`` for a bool, ``4.5`` for a rank, ``NaN`` for alpha;
    Python's truthiness and ``int()`` would silently compute something else. An int is fine
    where a float is expected (JSON writes ``16`` for ``16.0``); ``None`` is fine for list/dict
    fields (older PEFT versions write ``null`` for an empty pattern). Floats must be finite and
    within float32 range, since every weight ends up in float32 or lower.
    """
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "Any")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            continue  # e.g. a LoftQConfig object given in Python; validate() converts it
        if not _matches(value, annotation):
            raise AdapterConfigError(f"{cls}.{f.name} must be {annotation}, got {_short(value)}")
        bad = _bad_float(value)
        if bad is not None:
            raise AdapterConfigError(f"{cls}.{f.name} must hold finite numbers within float32 (ints: int64) range, got {bad!r}")


def check_scale(value: Any, where: str) -> None:
    """An alpha / scaling value: a finite number with ``|value| <= MAX_SCALE``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(float(value)) <= MAX_SCALE:
        raise AdapterConfigError(f"{where} must be a number with |value| <= {MAX_SCALE:g}, got {_short(value)}")


def check_positive_ints(values: dict[str, Any], where: str) -> None:
    """Every value of a ``rank_pattern``-like dict is a positive int (``4.5`` is refused, not truncated)."""
    for key, value in (values or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise AdapterConfigError(f"{where}[{key!r}] must be a positive integer, got {_short(value)}")


def check_field_patterns(config: AdapterConfig) -> None:
    """Compile every regex a config matches module paths with, so a hostile or invalid one fails
    here (AdapterConfigError naming the field) instead of hanging or raising re.error later."""
    from .targets import checked_pattern

    cls = type(config).__name__
    for name in _PATTERN_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str):
            if name in ("target_modules", "exclude_modules", "feedforward_modules", "layers_pattern"):
                checked_pattern(value, f"{cls}.{name}")
        elif isinstance(value, dict) and not any(isinstance(v, list) for v in value.values()):
            for key in value:  # (AdaLoRA's rank_pattern maps exact names to masks: not regexes)
                checked_pattern(key, f"{cls}.{name}")
        elif isinstance(value, list) and name in ("layers_pattern", "modules_to_save"):
            for entry in value:
                checked_pattern(entry, f"{cls}.{name}")


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _matches(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a string annotation such as ``list[int] | int | None``."""
    alternatives = _split_top(annotation, "|")
    if len(alternatives) > 1:
        return any(_matches(value, alt) for alt in alternatives)
    head, _, rest = annotation.partition("[")
    args = _split_top(rest[:-1], ",") if rest else []
    if head == "None":
        return value is None
    if head == "bool":
        return isinstance(value, (bool, np.bool_))
    if head == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if head == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if head == "str":
        return isinstance(value, (str, os.PathLike))
    if head in ("list", "tuple", "set", "Sequence"):
        if value is None:
            return True
        if not isinstance(value, (list, tuple, set, range)):
            return False
        item = args[0] if args and head != "tuple" else "Any"
        return all(_matches(v, item) for v in value)
    if head in ("dict", "Mapping"):
        if value is None:
            return True
        if not isinstance(value, dict):
            return False
        key_type, value_type = (args + ["Any", "Any"])[:2] if args else ("Any", "Any")
        return all(_matches(k, key_type) and _matches(v, value_type) for k, v in value.items())
    return True  # Any, or a type we do not model


def _bad_float(value: Any) -> float | None:
    """The first non-finite or beyond-float32 float (or beyond-int64 int) inside ``value``."""
    if isinstance(value, (float, np.floating)):
        return None if math.isfinite(value) and abs(value) <= _FLOAT32_MAX else float(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return None if abs(int(value)) < 2**63 else value  # no field needs more than int64
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            bad = _bad_float(item)
            if bad is not None:
                return bad
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
