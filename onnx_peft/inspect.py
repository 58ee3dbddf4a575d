"""What is in a model, an adapter file, a PEFT adapter dir or a deploy dir: slots, ranks, contract.

:func:`inspect_path` returns a plain dict (JSON-ready) so scripts and tests can read it;
:func:`render_text` turns it into a few readable lines for the ``onnx-peft inspect`` command.
Only headers and shapes are read: weights stay on disk (adapter files are small).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME
from .errors import OnnxPeftError
from .formats import ADAPTER_FILE_SUFFIXES
from .graph.contract import CONTRACT_KEY, read_contract

_A, _B = ".lora_A.weight", ".lora_B.weight"
_TOKENS, _NORM = ".trainable_tokens.indices", ".ln_delta.weight"


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    """Describe ``path``: an .onnx model, an adapter file, a PEFT dir or a deploy dir."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return inspect_peft_dir(path)
        if (path / "model.onnx").is_file():
            adapters = sorted(p for p in (path / "adapters").glob("*") if p.suffix in ADAPTER_FILE_SUFFIXES)
            return {"kind": "deploy_dir", "path": str(path),
                    "model": inspect_model(path / "model.onnx"),
                    "adapters": {p.stem: inspect_adapter_file(p) for p in adapters}}
        raise OnnxPeftError(f"{path}: neither a PEFT adapter dir ({CONFIG_NAME}) nor a deploy dir (model.onnx)")
    if path.suffix == ".onnx":
        return inspect_model(path)
    if path.suffix in ADAPTER_FILE_SUFFIXES:
        return inspect_adapter_file(path)
    raise OnnxPeftError(
        f"{path}: cannot inspect; pass an .onnx model, an adapter file ({', '.join(ADAPTER_FILE_SUFFIXES)}) "
        "or a directory"
    )


def _suffix_forms() -> dict[str, str]:
    """Slot suffix -> branch form (``lora_A.weight`` -> ``lora``), from every form's slots."""
    from .methods.forms import FORMS

    return {spec.suffix: f.name for f in FORMS.values() for spec in f.slot_specs("m", 1, 1, None)}


def _modules_from_names(shapes: dict[str, tuple[tuple[Any, ...], str]]) -> dict[str, dict[str, Any]]:
    """``{module: {"forms": [...], "rank": r, "in": .., "out": ..}}`` from slot tensor names and shapes."""
    suffixes = _suffix_forms()
    modules: dict[str, dict[str, Any]] = {}
    for name, (shape, _dtype) in sorted(shapes.items()):
        suffix = next((x for x in sorted(suffixes, key=len, reverse=True) if name.endswith("." + x)), None)
        if suffix is None:
            continue
        entry = modules.setdefault(name[: -len(suffix) - 1], {"forms": []})
        if suffixes[suffix] not in entry["forms"]:
            entry["forms"].append(suffixes[suffix])
        if name.endswith(_A):
            entry["rank"] = shape[-1] if len(shape) == 2 else None
            entry["in"] = shape[0] if shape else None
        elif name.endswith(_B):
            entry["out"] = shape[-1] if shape else None
        elif name.endswith(_TOKENS):  # trainable token rows: how many
            entry["tokens"] = shape[-1] if shape else None
        elif name.endswith(_NORM):    # LN Tuning: the norm's width
            entry["features"] = shape[-1] if shape else None
    for entry in modules.values():
        entry["method"] = "+".join(entry["forms"])
    return modules


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Slots (from the contract), their modules, and adapters baked in as initializers."""
    from .graph.io import load_model

    model = load_model(path)
    contract = read_contract(model.metadata_props)
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    baked = {name: (tuple(v.shape), v.dtype.numpy().name) for name, v in graph.initializers.items()
             if name not in inputs and name.endswith(tuple(_suffix_forms())) and v.shape is not None}
    info: dict[str, Any] = {
        "kind": "model", "path": str(path),
        "inputs": [v.name for v in graph.inputs if v.const_value is None],
        "outputs": [v.name for v in graph.outputs],
        "has_contract": CONTRACT_KEY in model.metadata_props,
        "fingerprint": contract.fingerprint if contract else "",
        "slots": [], "modules": {}, "baked_modules": _modules_from_names(baked),
    }
    if contract is not None:
        info["slots"] = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "module": s.module,
                          "method": s.method} for s in contract.slots]
        for slot in contract.slots:  # "method": the module's branch forms, e.g. "lora+dora"
            entry = info["modules"].setdefault(slot.module, {"method": slot.method, "slots": []})
            if slot.method not in entry["method"].split("+"):
                entry["method"] += "+" + slot.method
            entry["slots"].append(slot.name)
    from .graph.banks import MULTI_ADAPTER_KEY
    from .passes.extract_adapters import read_packing
    from .prompt_feeds import PromptLayout

    layout = model.metadata_props.get(MULTI_ADAPTER_KEY)
    info["multi_adapter"] = json.loads(layout) if layout else None
    prompt = PromptLayout.from_metadata(model.metadata_props)
    info["prompt"] = json.loads(prompt.to_json()) if prompt is not None else None
    info["packing"] = read_packing(model.metadata_props)
    return info


def inspect_adapter_file(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors, per-module ranks and the recorded fingerprint of an adapter file."""
    from .formats import format_for_path, load_adapter_file

    tensors, fingerprint = load_adapter_file(path)
    shapes = {n: (tuple(int(d) for d in t.shape), t.dtype.name) for n, t in tensors.items()}
    from .prompt_feeds import adapter_from_tensors

    prompt = adapter_from_tensors(tensors, str(path))
    return {
        "prompt": None if prompt is None else {"kind": prompt.kind, "length": prompt.length, "tasks": prompt.tasks},
        "kind": "adapter_file", "path": str(path), "format": format_for_path(path),
        "fingerprint": fingerprint,
        "tensors": {n: {"shape": list(s), "dtype": d} for n, (s, d) in sorted(shapes.items())},
        "modules": _modules_from_names(shapes),
    }


def inspect_peft_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Config summary and, per module, the method's tensors (shapes) and the slot forms it becomes."""
    from .convert import PeftAdapter
    from .formats import read_peft_adapter

    config, tensors = read_peft_adapter(path)
    adapter = PeftAdapter.from_tensors("adapter", str(path), config, tensors)
    info: dict[str, Any] = {"kind": "peft_adapter", "path": str(path), "peft_type": config.peft_type,
                            "modules": {}}
    for key in ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "fan_in_fan_out",
                "rank_pattern", "alpha_pattern", "token_indices", "trainable_token_indices", "base_model_name_or_path"):
        if hasattr(config, key):
            info[key] = getattr(config, key)
    for module, parts in sorted(adapter.modules.items()):
        entry: dict[str, Any] = {"method": config.peft_type.lower(),
                                 "tensors": {k: list(v.shape) for k, v in sorted(parts.items())}}
        if "lora_A.weight" in parts:
            entry["rank"] = int(parts["lora_A.weight"].shape[0])
        if hasattr(config, "scaling_for"):
            entry["scale"] = float(config.scaling_for(module))
        info["modules"][module] = entry
    if adapter.tensors.shared:
        info["shared"] = {k: list(v.shape) for k, v in sorted(adapter.tensors.shared.items())}
    if getattr(adapter.method, "is_prompt_learning", False):
        info["prompt"] = {"kind": adapter.method.kind, "num_virtual_tokens": config.num_virtual_tokens,
                          "tasks": adapter.method.tasks(config)}
    return info


def render_text(info: dict[str, Any]) -> str:
    """A few readable lines describing ``inspect_path``'s result."""
    kind = info["kind"]
    lines = []
    if kind == "deploy_dir":
        lines.append(f"deploy dir {info['path']}")
        lines.extend("  " + line for line in render_text(info["model"]).splitlines())
        for name, adapter in info["adapters"].items():
            lines.append(f"  adapter {name}:")
            lines.extend("    " + line for line in render_text(adapter).splitlines())
        return "\n".join(lines)
    if kind == "model":
        lines.append(f"model {info['path']}")
        lines.append(f"  inputs: {', '.join(info['inputs'])}; outputs: {', '.join(info['outputs'])}")
        lines.append(f"  contract: {'yes' if info['has_contract'] else 'none'}"
                     + (f", fingerprint {info['fingerprint']}" if info["fingerprint"] else ""))
        lines.append(f"  {len(info['slots'])} slots on {len(info['modules'])} modules")
        if info.get("multi_adapter"):
            layout = info["multi_adapter"]
            lines.append(f"  multi-adapter: {len(layout['banks'])} banks fed by the session, one adapter "
                         f"per row through {layout['ids_input']!r} (0 = base)")
        if info.get("packing"):
            lines.append("  packed inputs: " + ", ".join(group["data"] for group in info["packing"].values()))
        if info.get("prompt"):
            prompt = info["prompt"]
            via = {"inputs": "prefix.* inputs", "past": "the past key/values"}.get(prompt["prefix_via"], "")
            lines.append(f"  prompt-ready: virtual tokens of width {prompt['hidden']} through prompt_embeds"
                         + (f"; a prefix ({prompt['layers']} layers x {prompt['heads']} kv heads x {prompt['head_dim']})"
                            f" through {via}" if via else "") + "; one adapter per run or per row")
        for module, entry in sorted(info["modules"].items()):
            shapes = [s["shape"] for s in info["slots"] if s["module"] == module]
            lines.append(f"    {module} [{entry['method']}] {shapes}")
        if info["baked_modules"]:
            lines.append(f"  adapters baked in on {len(info['baked_modules'])} modules")
            for module, entry in sorted(info["baked_modules"].items()):
                lines.append(f"    {module} [{entry['method']}] rank {entry.get('rank')}")
        return "\n".join(lines)
    if kind == "adapter_file":
        lines.append(f"adapter file {info['path']} ({info['format']})")
        lines.append(f"  fingerprint: {info['fingerprint'] or 'none'}")
        if info.get("prompt"):
            prompt = info["prompt"]
            what = "virtual tokens" if prompt["kind"] == "prompt" else "prefix tokens per layer"
            lines.append(f"  prompt-learning adapter: {prompt['length']} {what}"
                         + (f", {prompt['tasks']} tasks" if prompt["tasks"] > 1 else ""))
            return "\n".join(lines)
        lines.append(f"  {len(info['tensors'])} tensors on {len(info['modules'])} modules")
        for module, entry in sorted(info["modules"].items()):
            detail = ", ".join(f"{k} {entry[k]}" for k in ("tokens", "features") if k in entry) \
                if "rank" not in entry else f"rank {entry['rank']} {entry.get('in')} -> {entry.get('out')}"
            lines.append(f"    {module} [{entry['method']}] {detail}")
        return "\n".join(lines)
    lines.append(f"PEFT adapter {info['path']} ({info['peft_type']})")
    for key in ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                "token_indices", "trainable_token_indices"):
        if key in info and info[key] not in (None, {}, False):
            lines.append(f"  {key}: {info[key]}")
    if info.get("prompt"):
        prompt = info["prompt"]
        lines.append(f"  {prompt['kind']}: {prompt['num_virtual_tokens']} virtual tokens"
                     + (f", {prompt['tasks']} tasks" if prompt["tasks"] > 1 else "") + "; no merged form")
        return "\n".join(lines)
    lines.append(f"  {len(info['modules'])} modules")
    for module, entry in sorted(info["modules"].items()):
        detail = (f"rank {entry['rank']} scale {entry['scale']:g}" if "rank" in entry and "scale" in entry
                  else ", ".join(f"{k} {v}" for k, v in entry["tensors"].items()))
        lines.append(f"    {module} [{entry['method']}] {detail}")
    return "\n".join(lines)
