"""Execution providers for every session onnx-peft creates: which ones, with which options.

Why a module of its own: the CUDA provider's default runs fp32 MatMuls in TF32, which moves fp32
outputs 3e-4..7e-4 away from PyTorch (field notes); onnx-peft promises CPU parity on CUDA, so
TF32 is off unless the user opts in. ONNX Runtime also ignores options it does not know on some
providers and silently falls back to the CPU when a provider is missing; both are turned into a
:class:`RuntimeSessionError` naming the option or the provider.

    device="auto"  -> CUDA (use_tf32=0) then CPU when onnxruntime-gpu has CUDA, else CPU
    device="cuda"  -> CUDA (use_tf32=0) then CPU; an error when this onnxruntime has no CUDA
    device="cpu"   -> CPU
    providers=[...] (ORT's own form: names or (name, options) pairs) overrides ``device``
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RuntimeSessionError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
_SHORT = {"cuda": CUDA, "cpu": CPU, "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider"}


@dataclass
class ProviderPlan:
    """Providers in priority order, each with its options (strings, as ORT takes them)."""

    names: list[str]
    options: list[dict[str, str]] = field(default_factory=list)
    explicit: bool = False  # the user named the providers or the device: no silent CPU fallback

    @property
    def device(self) -> str:
        return "cuda" if self.names and self.names[0] == CUDA else "cpu"


def plan_providers(ort: Any, providers: Sequence[Any] | None = None, device: str | None = None,
                   provider_options: Mapping[str, Mapping[str, Any]] | None = None,
                   tf32: bool = False) -> ProviderPlan:
    """The providers a session asks ONNX Runtime for.

    ``provider_options``: ``{"CUDAExecutionProvider": {"device_id": "1"}}`` (short names ``cuda``,
    ``cpu`` work too); merged over the defaults. ``tf32=True`` lets CUDA use TF32 (faster fp32,
    ~1e-3 off PyTorch); an explicit ``use_tf32`` option wins over both."""
    if device is not None and device not in DEVICES:
        raise RuntimeSessionError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = list(ort.get_available_providers())
    user_options = _user_options(provider_options)
    if providers is not None:
        names, options = _split(providers)
        missing = [n for n in names if n not in available]
        if missing:
            raise RuntimeSessionError(
                f"execution provider {missing[0]} is not in this onnxruntime (it has {', '.join(available)}); "
                + ("install onnxruntime-gpu for CUDA" if missing[0] == CUDA else "pick one of those"))
        explicit = True
    elif device in (None, "auto"):
        names = [CUDA, CPU] if CUDA in available else [CPU]
        options, explicit = [{} for _ in names], False
    elif device == "cuda":
        if CUDA not in available:
            raise RuntimeSessionError(
                "device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider (it has "
                f"{', '.join(available)}); install onnxruntime-gpu (and CUDA 12/13 with cuDNN 9), or use device 'cpu'")
        names, options, explicit = [CUDA, CPU], [{}, {}], True
    else:
        names, options, explicit = [CPU], [{}], True
    unused = sorted(set(user_options) - set(names))
    if unused:
        keys = ", ".join(sorted(user_options[unused[0]]))
        raise RuntimeSessionError(f"provider option(s) {keys} are for {unused[0]}, which this session does not use "
                                  f"(it uses {', '.join(names)})")
    for i, name in enumerate(names):
        merged = {**options[i], **user_options.get(name, {})}
        if name == CUDA and "use_tf32" not in merged:
            merged["use_tf32"] = "1" if tf32 else "0"
        options[i] = merged
    return ProviderPlan(names, options, explicit)


def check_applied(session: Any, plan: ProviderPlan) -> None:
    """Refuse options the created session did not take (ORT drops unknown keys on some
    providers): each must come back from ``get_provider_options`` with the value given."""
    applied = session.get_provider_options()
    for name, options in zip(plan.names, plan.options):
        if name not in applied:
            continue
        for key, value in options.items():
            if key not in applied[name]:
                known = ", ".join(sorted(applied[name])) or "none"
                raise RuntimeSessionError(f"{name} rejected provider option {key!r}: it is not one it takes "
                                          f"(it takes: {known})")
            if _canonical(applied[name][key]) != _canonical(value):
                raise RuntimeSessionError(f"{name} rejected provider option {key}={value!r}: it kept "
                                          f"{applied[name][key]!r}")


def rejected_option(error: Exception, plan: ProviderPlan) -> str | None:
    """The option a session-creation error names, if it names one of ours."""
    text = str(error)
    for name, options in zip(plan.names, plan.options):
        for key in options:  # a whole word: option "x" is not named by "index" or "x.onnx"
            if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w|\.\w)", text):
                return f"{name} rejected provider option {key}={options[key]!r}: {text.strip().splitlines()[-1]}"
    return None


def _user_options(provider_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, str]]:
    if provider_options is None:
        return {}
    if not isinstance(provider_options, Mapping):
        raise RuntimeSessionError("provider_options must map a provider name to its options, e.g. "
                                  "{'CUDAExecutionProvider': {'device_id': '1'}}")
    out: dict[str, dict[str, str]] = {}
    for name, options in provider_options.items():
        if not isinstance(options, Mapping):
            raise RuntimeSessionError(f"provider_options[{name!r}] must be a dict of option -> value")
        full = _SHORT.get(str(name).lower(), str(name))
        out.setdefault(full, {}).update({str(k): _option_text(v) for k, v in options.items()})
    return out


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _canonical(value: Any) -> str:
    """An option value as ORT writes it back: booleans ("true", "False") as "1"/"0", integers
    without sign or leading zeros ("01" -> "1"); ORT parses both forms, so both are the same value."""
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return "1" if text.lower() == "true" else "0"
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def _split(providers: Sequence[Any]) -> tuple[list[str], list[dict[str, str]]]:
    if isinstance(providers, str) or not isinstance(providers, Sequence) or not providers:
        raise RuntimeSessionError("providers must be a non-empty list of provider names or (name, options) pairs, "
                                  "e.g. ['CUDAExecutionProvider', 'CPUExecutionProvider']")
    names, options = [], []
    for entry in providers:
        if isinstance(entry, str):
            name, opts = entry, {}
        elif (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], Mapping)):
            name, opts = entry
        else:
            raise RuntimeSessionError(f"provider entry {entry!r}: expected a name or a (name, options) pair")
        names.append(_SHORT.get(name.lower(), name))
        options.append({str(k): _option_text(v) for k, v in opts.items()})
    return names, options


def parse_option_flags(values: Sequence[str]) -> dict[str, dict[str, str]]:
    """CLI ``--provider-option [PROVIDER:]KEY=VALUE`` (repeatable) -> provider_options; without
    ``PROVIDER:`` the option is for CUDA, the only provider the CLI tunes."""
    out: dict[str, dict[str, str]] = {}
    for text in values:
        head, sep, value = text.partition("=")  # the value may hold ':' (a path), the key does not
        provider, colon, key = head.partition(":")
        if not colon:
            provider, key = "cuda", head
        if not sep or not key or not provider:
            raise RuntimeSessionError(f"--provider-option {text!r}: expected KEY=VALUE or PROVIDER:KEY=VALUE, "
                                      "e.g. device_id=1")
        full = _SHORT.get(provider.lower(), provider)
        out.setdefault(full, {})[key] = value
    return out
