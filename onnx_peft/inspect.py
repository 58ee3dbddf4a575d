"""What is in a model, an adapter file, a PEFT adapter dir or a deploy dir: slots, ranks, contract.

:func:`inspect_path` returns a plain dict (JSON-ready) so scripts and tests can read it;
:func:`render_text` turns it into a few readable lines for the ``onnx-peft inspect`` command.
Only headers and shapes are read: weights stay on disk (adapter files are small).

A model's adapters are found two ways:

- slots: the contract (graph/contract.py) lists them; shown per module as
  ``rank any, 64 -> 32`` (the rank dim is symbolic: any adapter rank fits);
- baked in (``export --mode in-graph``, ``insert --in-graph``, a PEFT model exported unmerged by
  another tool): LoRA/DoRA branches recognised by structure (graph/sites.py, the same matcher
  ``extract`` uses, so names do not matter), other forms by their slot-style initializer names or
  the ``onnx_peft.branch`` tags our grafts leave (graph/branch.py). Shown as
  ``6 modules with baked LoRA (rank 4)``. A merged adapter leaves no trace: it is weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME
from .errors import OnnxPeftError
from .formats import ADAPTER_FILE_SUFFIXES
from .graph.contract import CONTRACT_KEY, FULL_WEIGHT_METHOD, read_contract

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


# slot suffix -> the dim it shows, for forms without A/B (their last axis)
_WIDTH_OF = {"ia3_l.in": "in", "rotation.weight": "in", "ia3_l.out": "out", "rotate_out.cos": "out",
             "delta.weight": "out", "dora_factor": "out"}
_METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3_in": "IA3", "ia3_out": "IA3", "lora+dora": "DoRA"}


def _modules_from_names(shapes: dict[str, tuple[tuple[Any, ...], str]]) -> dict[str, dict[str, Any]]:
    """``{module: {"forms": [...], "rank": r, "in": .., "out": ..}}`` from slot tensor names and shapes.

    A symbolic dim (a slot model's ``lora_r.<module>``) stays a string: any size fits there.
    """
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
        elif suffix in _WIDTH_OF and shape:
            entry.setdefault(_WIDTH_OF[suffix], shape[-1])
    for entry in modules.values():
        entry["method"] = "+".join(entry["forms"])
    return modules


def _baked_modules(model: Any, slot_modules: set[str]) -> dict[str, dict[str, Any]]:
    """Modules whose adapter is part of the graph: ``{module: {"method", "forms", "rank"?, "in"?, "out"?}}``.

    Structure first (LoRA/DoRA ``Add(x W, (x A) B)``, any names, rank from A's shape), then
    slot-named initializers (``insert --in-graph`` of other forms), then ``onnx_peft.branch``
    tags on nodes of modules not yet found (a form whose weights have no telling name).
    """
    from .graph.branch import BRANCH_KEY
    from .graph.sites import find_adapter_branches

    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    named = {name: (tuple(v.shape), v.dtype.numpy().name) for name, v in graph.initializers.items()
             if name not in inputs and name.endswith(tuple(_suffix_forms())) and v.shape is not None}
    baked = {m: e for m, e in _modules_from_names(named).items() if m not in slot_modules}
    for module, branch in find_adapter_branches(model).items():
        if branch.is_input or module in slot_modules:
            continue
        shape = branch.lora_A.shape if branch.lora_A.shape is not None else branch.lora_A.const_value.shape
        rank = int(shape[1] if branch.lora_A_layout == "in_r" else shape[0])
        entry = baked.setdefault(module, {"forms": []})
        for form in ("lora", branch.method) if branch.method != "lora" else ("lora",):
            if form not in entry["forms"]:
                entry["forms"].append(form)
        entry.update(rank=rank, **{"in": branch.base.in_features, "out": branch.base.out_features})
    for node in graph.all_nodes():
        module = node.metadata_props.get(BRANCH_KEY)
        if module and module not in baked and module not in slot_modules:
            baked[module] = {"forms": []}
    for entry in baked.values():
        entry["method"] = "+".join(entry["forms"]) or "adapter"
    return dict(sorted(baked.items()))


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Slots (from the contract), their modules, and adapters baked into the graph."""
    from .graph.io import load_model

    model = load_model(path)
    contract = read_contract(model.metadata_props)
    graph = model.graph
    slot_modules = {s.module for s in contract.slots} if contract is not None else set()
    info: dict[str, Any] = {
        "kind": "model", "path": str(path),
        "inputs": [v.name for v in graph.inputs if v.const_value is None],
        "outputs": [v.name for v in graph.outputs],
        "has_contract": CONTRACT_KEY in model.metadata_props,
        "fingerprint": contract.fingerprint if contract else "",
        "slots": [], "modules": {}, "baked_modules": _baked_modules(model, slot_modules),
    }
    if contract is not None:
        info["slots"] = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "module": s.module,
                          "method": s.method} for s in contract.slots]
        for slot in contract.slots:  # "method": the module's branch forms, e.g. "lora+dora"
            entry = info["modules"].setdefault(slot.module, {"method": slot.method, "slots": []})
            if slot.method not in entry["method"].split("+"):
                entry["method"] += "+" + slot.method
            entry["slots"].append(slot.name)
            if slot.method == FULL_WEIGHT_METHOD and slot.name.endswith(".weight"):
                entry["weight"] = list(slot.shape)
        shapes = {s.name: (tuple(s.shape), s.dtype) for s in contract.slots}
        for module, found in _modules_from_names(shapes).items():  # rank / in / out, as for adapter files
            if module in info["modules"]:
                info["modules"][module].update({k: v for k, v in found.items() if k not in ("method", "forms")})
    from .graph.banks import MULTI_ADAPTER_KEY, MultiLayout
    from .graph.packing import read_packing
    from .prompt_feeds import PromptLayout

    layout = model.metadata_props.get(MULTI_ADAPTER_KEY)
    # parsed and checked (a ModelFileError naming the key), then shown as the writer recorded it
    info["multi_adapter"] = json.loads(MultiLayout.from_json(layout, str(path)).to_json()) if layout else None
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
        if info["slots"]:
            lines.append(f"  {len(info['slots'])} adapter slots on {len(info['modules'])} modules "
                         "(adapters load at run time)")
        for module, entry in sorted(info["modules"].items()):
            lines.append(f"    {module} [{entry['method']}] {_detail(entry)}")
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
        baked = info["baked_modules"]
        if baked:
            extractable = all(e["method"] in ("lora", "dora", "lora+dora") for e in baked.values())
            lines.append(f"  adapter baked into the graph: {_baked_summary(baked)}"
                         + ("; `onnx-peft extract` turns it into slots" if extractable and not info["slots"] else ""))
            for module, entry in baked.items():
                lines.append(f"    {module} [{entry['method']}] {_detail(entry)}")
        if not baked and not info["slots"] and not info.get("prompt"):
            lines.append("  no adapter found: a base model, or one with its adapter merged into the weights")
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
            lines.append(f"    {module} [{entry['method']}] {_detail(entry)}")
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


def _dim(value: Any) -> str:
    """A slot dim for people: an int, or ``any`` for a symbolic one."""
    return str(value) if isinstance(value, int) else "any"


def _detail(entry: dict[str, Any]) -> str:
    """``rank 4, 64 -> 32`` (``any rank`` for a slot) for LoRA-shaped modules; the widths that
    exist for the others."""
    if entry.get("rank") is not None:
        rank = f"rank {entry['rank']}" if isinstance(entry["rank"], int) else "any rank"
        return f"{rank}, {_dim(entry.get('in'))} -> {_dim(entry.get('out'))}"
    if "weight" in entry:  # modules_to_save: the whole Linear is the slot
        return "trained in full, weight " + " x ".join(_dim(d) for d in entry["weight"])
    parts = [f"{_dim(entry['tokens'])} token rows" if "tokens" in entry else "",
             f"width {_dim(entry['features'])}" if "features" in entry else "",
             f"in {_dim(entry['in'])}" if "in" in entry else "",
             f"out {_dim(entry['out'])}" if "out" in entry else ""]
    return ", ".join(p for p in parts if p)


def _baked_summary(baked: dict[str, dict[str, Any]]) -> str:
    """``6 modules with baked LoRA (rank 4)``; one phrase per method, ranks as a range."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in baked.values():
        by_method.setdefault(entry["method"], []).append(entry)
    phrases = []
    for method, entries in sorted(by_method.items()):
        ranks = sorted({e["rank"] for e in entries if isinstance(e.get("rank"), int)})
        rank = "" if not ranks else f" (rank {ranks[0]})" if len(ranks) == 1 else f" (ranks {ranks[0]}-{ranks[-1]})"
        what = "a baked adapter branch (method not recognised)" if method == "adapter" \
            else f"baked {_METHOD_NAMES.get(method, method.upper())}{rank}"
        phrases.append(f"{len(entries)} module{'s' if len(entries) != 1 else ''} with {what}")
    return "; ".join(phrases)
