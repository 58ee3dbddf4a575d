"""JSON pass recipes, in the shape of Olive workflow configs, run as onnx_ir pass pipelines.

A recipe::

    {
      "input_model": {"type": "HfModel", "model_path": "my-model"} | {"type": "ONNXModel", "model_path": "m.onnx"},
      "adapters": {"sentiment": "adapters/sentiment"},          # PEFT dirs (optional)
      "passes": [{"type": "ExtractAdapters", "make_inputs": true}, ...]   # or Olive's {"name": {...}}
      "output_dir": "out"
    }

Step kinds: ``LoRA`` trains an adapter on the HF model (Olive's LoRA pass), ``OnnxConversion``
exports it, and the graph steps (``MergeAdapterWeights``, ``ExtractAdapters``,
``InsertAdapters``, ``MultiAdapter``) run back to back as one ``onnx_ir`` PassManager on the
loaded model, saved once. Every step's type and options are checked before any work starts;
a mistake lists the valid names. Paths in a recipe are relative to the recipe file; a shipped
recipe (``onnx-peft run merge``: a name from ``onnx_peft/recipes/``, with or without ``.json``)
takes its paths relative to the current folder. The output folder is built beside ``output_dir``
and swapped in whole when every step has run (a non-empty one needs ``overwrite=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

RECIPES_DIR = Path(__file__).with_name("recipes")


@dataclass
class RecipeState:
    """What the pipeline has produced so far."""

    output_dir: Path
    hf_model: Path | None = None
    onnx_model: Path | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_files: dict[str, Path] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepType:
    """A recipe step: its options (name -> default) and whether it is an onnx_ir graph pass."""

    options: Mapping[str, Any]
    graph_pass: bool
    build: Callable[[dict[str, Any], RecipeState], Any]


# -- step builders --------------------------------------------------------------------------------
def _lora(options: dict[str, Any], state: RecipeState, step: str = "LoRA") -> None:
    """Olive's LoRA / QLoRA / LoftQ passes: train an adapter on local data (QLoRA: on a 4-bit base;
    LoftQ: LoRA initialised by alternating NF4 quantization and SVD)."""
    from .training import train

    if state.hf_model is None:
        raise RecipeError(f"{step}: the recipe needs an input_model of type HfModel (a transformers folder)")
    data = options.get("train_data_config") or {}
    if "data_files" not in data:
        raise RecipeError(f"{step}: train_data_config.data_files (a local .jsonl/.csv/.txt file) is required")
    config = {"r": options["r"], "lora_alpha": options["alpha"], "lora_dropout": options["lora_dropout"],
              "target_modules": options["target_modules"], "use_dora": options.get("use_dora", False)}
    quantize = None
    if step == "QLoRA":
        quantize = {"quant_type": options["quant_type"], "double_quant": options["double_quant"]}
    if step == "LoftQ":
        config.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": options["loftq_iter"]})
    name = options["adapter_name"]
    out = state.output_dir / "adapters_peft" / name
    train(state.hf_model, data["data_files"], out, method="lora", task=data.get("task", "sequence-classification"),
          text_field=data.get("text_field", "text"), label_field=data.get("label_field", "label"),
          config=config, training_args=options.get("training_args") or {}, eval_data=data.get("eval_files"),
          quantize=quantize)
    state.adapters[name] = out
    state.log.append(f"{step}: trained adapter {name!r} -> {out}")


def _onnx_conversion(options: dict[str, Any], state: RecipeState) -> None:
    from .export import export

    if state.hf_model is None:
        raise RecipeError("OnnxConversion: the recipe needs an input_model of type HfModel")
    out = state.output_dir / "exported"
    mode = options["mode"]
    adapters = dict(state.adapters) or None
    if mode == "in-graph" and adapters and len(adapters) > 1:
        mode = "inputs"
    state.onnx_model = export(state.hf_model, out, adapters=adapters, task=options["task"], mode=mode,
                              dtype=options["dtype"], opset=options["target_opset"], quantize=options["quantize"],
                              double_quant=options["double_quant"], block_size=options["block_size"])
    for path in sorted((out / "adapters").glob("*.onnx_adapter")):
        state.adapter_files[path.stem] = path
    state.log.append(f"OnnxConversion: {state.onnx_model}")


def _merge(options: dict[str, Any], state: RecipeState) -> Any:
    """Merge the graph's own adapter branches, or the one adapter the recipe (or --adapter) names."""
    from .passes.merge_adapters import MergeAdapters

    adapter = options["adapter"]
    if adapter is None and len(state.adapters) > 1:
        raise RecipeError(f"MergeAdapterWeights merges one adapter, the recipe has {len(state.adapters)} "
                          f"({', '.join(state.adapters)}); name one with \"adapter\": NAME")
    if adapter is None:
        adapter_dir = next(iter(state.adapters.values()), None)
    elif adapter in state.adapters:
        adapter_dir = state.adapters[adapter]
    else:
        adapter_dir = Path(adapter)
    return MergeAdapters(adapter_dir=adapter_dir)


def _extract(options: dict[str, Any], state: RecipeState) -> Any:
    from .passes.extract_adapters import ExtractAdapters

    save_format = {"numpy": "npz"}.get(options["save_format"], options["save_format"])
    return ExtractAdapters(make_inputs=options["make_inputs"], pack_inputs=options["pack_inputs"],
                           optional_inputs=options["optional_inputs"], external=options["external"],
                           save_format=save_format, full_weight_modules=options["full_weight_modules"],
                           full_weight_biases=options["full_weight_biases"])


def _insert(options: dict[str, Any], state: RecipeState) -> Any:
    from .passes.insert_adapters import InsertAdapters

    if not state.adapters:
        raise RecipeError("InsertAdapters: the recipe names no adapters (add \"adapters\" or a LoRA step)")
    return InsertAdapters(dict(state.adapters), mode=options["mode"])


def _quantize_base(options: dict[str, Any], state: RecipeState) -> Any:
    from .passes.quantize_base import QuantizeBase

    return QuantizeBase(options["quant_type"], options["block_size"], options["double_quant"],
                        skip=tuple(options["skip"]))


def _multi(options: dict[str, Any], state: RecipeState) -> Any:
    from .passes.multi_adapter import MultiAdapterPass

    return MultiAdapterPass(ids_input=options["ids_input"])


STEP_TYPES: dict[str, StepType] = {
    "LoRA": StepType({"r": 16, "alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                      "use_dora": False, "adapter_name": "default", "train_data_config": None,
                      "training_args": None}, False, _lora),
    # Olive's QLoRA / LoftQ: compute_dtype is accepted for Olive recipes; CPU training runs in fp32
    "QLoRA": StepType({"r": 16, "alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                       "adapter_name": "default", "train_data_config": None, "training_args": None,
                       "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}, False,
                      lambda options, state: _lora(options, state, "QLoRA")),
    "LoftQ": StepType({"r": 16, "alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                       "adapter_name": "default", "train_data_config": None, "training_args": None,
                       "loftq_iter": 1, "compute_dtype": "float32"}, False,
                      lambda options, state: _lora(options, state, "LoftQ")),
    "OnnxConversion": StepType({"task": "auto", "mode": "in-graph", "dtype": "fp32", "target_opset": None,
                                "quantize": None, "double_quant": False, "block_size": 64},
                               False, _onnx_conversion),
    "MergeAdapterWeights": StepType({"adapter": None}, True, _merge),
    # dynamic_lora_r: Olive's flag; our rank dims are always symbolic (one per module).
    "ExtractAdapters": StepType({"make_inputs": True, "pack_inputs": False, "optional_inputs": True,
                                 "external": False, "dynamic_lora_r": True, "save_format": "onnx_adapter",
                                 "full_weight_modules": (), "full_weight_biases": ()},
                                True, _extract),
    "InsertAdapters": StepType({"mode": "slots"}, True, _insert),
    "MultiAdapter": StepType({"ids_input": "adapter_ids"}, True, _multi),
    "QuantizeBase": StepType({"quant_type": "nf4", "block_size": 64, "double_quant": False, "skip": ("lm_head",)},
                             True, _quantize_base),
}
ALIASES = {"MergeAdapters": "MergeAdapterWeights", "Export": "OnnxConversion", "LoRAPass": "LoRA"}


# -- loading and checking --------------------------------------------------------------------------
def _steps(recipe: Mapping[str, Any], source: str) -> list[tuple[str, dict[str, Any]]]:
    passes = recipe.get("passes")
    if isinstance(passes, Mapping):
        entries = list(passes.values())
    elif isinstance(passes, list):
        entries = passes
    else:
        raise RecipeError(f"{source}: 'passes' must be a list of pass entries (or Olive's name -> entry map)")
    steps = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "type" not in entry:
            raise RecipeError(f"{source}: pass #{index + 1} needs a \"type\"; valid: {', '.join(STEP_TYPES)}")
        type_name = ALIASES.get(entry["type"], entry["type"])
        if type_name not in STEP_TYPES:
            raise RecipeError(f"{source}: pass #{index + 1} has unknown type {entry['type']!r}; "
                              f"valid: {', '.join(STEP_TYPES)}")
        step = STEP_TYPES[type_name]
        unknown = sorted(set(entry) - {"type"} - set(step.options))
        if unknown:
            raise RecipeError(f"{source}: pass #{index + 1} ({type_name}) has unknown option {unknown[0]!r}; "
                              f"valid: {', '.join(step.options) or 'none'}")
        steps.append((type_name, {**step.options, **{k: v for k, v in entry.items() if k != "type"}}))
    if not steps:
        raise RecipeError(f"{source}: the recipe has no passes")
    return steps


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in ``onnx_peft/recipes/`` (``merge``, ``insert``...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file: a path, or a shipped recipe's name (``merge`` or ``merge.json``).

    A shipped recipe's relative paths are taken from the current folder, not the package's."""
    path = Path(path)
    base_dir = None
    if not path.exists() and path.parent == Path(".") and path.stem in shipped_recipes() \
            and path.suffix in ("", ".json"):
        path, base_dir = RECIPES_DIR / f"{path.stem}.json", Path.cwd()
    elif path.is_dir():
        raise RecipeError(f"{path}: is a folder; give a recipe .json file or one of: {', '.join(shipped_recipes())}")
    try:
        recipe = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file; shipped recipes: {', '.join(shipped_recipes())}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a JSON object")
    recipe["_base_dir"] = str(base_dir or path.resolve().parent)
    recipe.setdefault("_source", str(path))
    return recipe


def _resolve(base: Path, value: str | os.PathLike | None) -> Path | None:
    if value is None:
        return None
    value = Path(value)
    return value if value.is_absolute() or value.exists() else base / value


def run_recipe(recipe: Mapping[str, Any] | str | os.PathLike, model: str | os.PathLike | None = None,
               adapters: Mapping[str, str | os.PathLike] | None = None,
               output_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
               overwrite: bool = False) -> RecipeState:
    """Run a recipe; arguments override the recipe's input model, adapters, output dir and data.

    Everything is written to a temporary sibling of the output folder, which replaces the output
    folder whole at the end; a non-empty output folder is refused unless ``overwrite=True``.
    The returned state's paths are in the output folder."""
    from .output_folder import check_output_folder, writing_folder

    if not isinstance(recipe, Mapping):
        recipe = load_recipe(recipe)
    base = Path(recipe.get("_base_dir", "."))
    source = recipe.get("_source", "recipe")
    steps = _steps(recipe, source)
    input_model = recipe.get("input_model") or {}
    if isinstance(input_model, str):
        input_model = {"model_path": input_model}
    model_path = Path(model) if model else _resolve(base, input_model.get("model_path"))
    if model_path is None:
        raise RecipeError(f"{source}: no input model; give input_model.model_path or --model")
    out = Path(output_dir) if output_dir else _resolve(base, recipe.get("output_dir", "recipe_output"))
    is_onnx = model_path.suffix == ".onnx" or input_model.get("type") == "ONNXModel"
    recipe_adapters = {k: _resolve(base, v) for k, v in (recipe.get("adapters") or {}).items()}
    adapter_dirs = {k: Path(v) for k, v in (adapters or recipe_adapters).items()}
    if data is not None:
        for _, options in steps:
            if "train_data_config" in options:
                options["train_data_config"] = {**(options["train_data_config"] or {}), "data_files": str(data)}
    inputs = [model_path, *adapter_dirs.values()]
    check_output_folder(out, inputs, overwrite)
    with writing_folder(out, inputs, overwrite) as staged:
        state = RecipeState(output_dir=staged, adapters=adapter_dirs)
        state.onnx_model, state.hf_model = (model_path, None) if is_onnx else (None, model_path)
        _run_steps(steps, state, source)
    return _moved(state, staged, out)


def _moved(state: RecipeState, staged: Path, out: Path) -> RecipeState:
    """The state with every path inside the staging folder pointed at the output folder."""
    def move(path: Path | None) -> Path | None:
        if path is None or (path != staged and staged not in path.parents):
            return path
        return out / path.relative_to(staged)

    return RecipeState(output_dir=out, hf_model=move(state.hf_model), onnx_model=move(state.onnx_model),
                       adapters={k: move(v) for k, v in state.adapters.items()},
                       adapter_files={k: move(v) for k, v in state.adapter_files.items()},
                       log=[line.replace(str(staged), str(out)) for line in state.log])


def _run_steps(steps: list[tuple[str, dict[str, Any]]], state: RecipeState, source: str) -> None:
    """Run the steps in order; consecutive graph passes run as one PassManager, saved once."""
    import onnx_ir as ir

    from .graph.io import load_model

    out = state.output_dir
    index = 0
    while index < len(steps):
        type_name, options = steps[index]
        if not STEP_TYPES[type_name].graph_pass:
            STEP_TYPES[type_name].build(options, state)
            index += 1
            continue
        group = []
        while index < len(steps) and STEP_TYPES[steps[index][0]].graph_pass:
            group.append(steps[index])
            index += 1
        if state.onnx_model is None:
            raise RecipeError(f"{source}: {group[0][0]} needs an ONNX model; add an OnnxConversion step first")
        passes = [STEP_TYPES[name].build(opts, state) for name, opts in group]
        ir_model = load_model(state.onnx_model)
        try:
            ir.passes.PassManager(passes)(ir_model)
        except ir.passes.PassError as exc:  # surface our own error, not onnx_ir's wrapper
            cause = exc
            while cause.__cause__ is not None and isinstance(cause, ir.passes.PassError):
                cause = cause.__cause__
            raise cause from None
        state.onnx_model = _save(ir_model, out / "model.onnx", passes)
        _write_adapter_files(passes, state)
        state.log.append(f"{' + '.join(name for name, _ in group)}: {state.onnx_model}")


def _save(model: Any, path: Path, passes: list[Any]) -> Path:
    """Save once; an external-mode extraction keeps its adapter tensors in their own side file."""
    from .graph.io import save_model
    from .passes.extract_adapters import ExtractAdapters, save_extracted_model

    external = [p for p in passes if isinstance(p, ExtractAdapters) and p.external]
    if external:
        return save_extracted_model(model, path, external[-1])
    return save_model(model, path, external_data=True)


def _write_adapter_files(passes: list[Any], state: RecipeState) -> None:
    """Side outputs of graph passes: the adapters that left the graph, as adapter files."""
    from .formats import save_adapter_file, suffix_for
    from .passes.extract_adapters import ExtractAdapters
    from .passes.insert_adapters import InsertAdapters, adapter_file_tensors

    for graph_pass in passes:
        if isinstance(graph_pass, ExtractAdapters) and graph_pass.tensors:
            path = state.output_dir / "adapters" / f"extracted{suffix_for(graph_pass.save_format)}"
            state.adapter_files["extracted"] = save_adapter_file(
                path, graph_pass.tensors, graph_pass.contract.fingerprint, graph_pass.save_format)
        if isinstance(graph_pass, InsertAdapters) and graph_pass.mode == "slots":
            for name, adapter in graph_pass.adapters.items():
                tensors = adapter_file_tensors(adapter, graph_pass.contract, graph_pass.base_weight,
                                               graph_pass.module_maps.get(name))
                path = state.output_dir / "adapters" / f"{name}.onnx_adapter"
                state.adapter_files[name] = save_adapter_file(path, tensors, graph_pass.contract.fingerprint)
