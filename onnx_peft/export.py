"""Export a transformers model, a PeftModel, or a folder of either, to ONNX.

Why this module exists: the graph passes (merge, extract, multi-adapter) need an ONNX model
whose adapter branches are still recognisable, and users need one call that goes from a
trained adapter to a deploy folder::

    OUT_DIR/model.onnx              (+ model.onnx.data when the weights exceed ~1 GB)
    OUT_DIR/export_info.json        task, mode, dtype, exporter, inputs, outputs, adapters
    OUT_DIR/adapters/NAME.onnx_adapter   (modes "inputs" / "external" only)

The exporter is ``torch.onnx.export(dynamo=True)`` with its optimizer on; the TorchScript
exporter is tried only when dynamo fails. The module path of every layer stays recoverable:
the exported module shares its children with the transformers model (see :class:`_TaskModule`),
so each node's ``pkg.torch.onnx.name_scopes`` ends in the real path
(``model.layers.0.self_attn.q_proj.lora_A.default``) and each pre-transposed weight records
its parameter in ``pkg.onnxscript.optimizer.folded_from``. Both are kept.

Tasks and their signatures (all ints are int64; dims named as in the graph)::

    causal-lm                input_ids, attention_mask [batch, sequence] -> logits [batch, sequence, vocab]
    causal-lm-with-past      + position_ids [batch, sequence],
                             past_key_values.N.key/value [batch, kv_heads, past_sequence, head_dim]
                             -> logits, present.N.key/value [batch, kv_heads, past_sequence + sequence, head_dim]
                             (attention_mask is [batch, total_sequence]; past_sequence = 0 is prefill)
    feature-extraction       input_ids, attention_mask (, token_type_ids) -> last_hidden_state [batch, sequence, hidden]
    sequence-classification  input_ids, attention_mask (, token_type_ids) -> logits [batch, num_labels]

Modes: ``in-graph`` keeps the adapter branches with their weights as initializers; ``merged``
folds the adapter into the base weights first (same nodes as the base export); ``inputs`` /
``external`` export in-graph and then move adapter tensors out of the graph
(:mod:`onnx_peft.passes.extract_adapters`), writing each given adapter as a slot file.

torch and transformers are imported inside functions only: ``import onnx_peft`` stays torch-free.
This module never imports ``peft``; PEFT models are recognised by their attributes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import (
    AdapterConfigError,
    ExportError,
    MissingDependencyError,
    ModelFileError,
    OnnxPeftError,
    UnsafePathError,
    require_torch,
)
from .export_adapters import (  # noqa: F401  (public names of export, kept importable here)
    AdapterSpec,
    _base_heads,
    _head_slots,
    _write_trained_heads,
    adapter_num_labels,
    attach_adapters,
    full_weight_modules,
    is_peft_model,
    needs_insert,
    normalize_adapters,
    saved_heads,
    slot_model,
    transformers_model,
    union_targets,
)
from .export_spec import ExportSpec, _task_module_class, cache_tensors, export_spec, make_cache  # noqa: F401
from .formats import suffix_for
from .progress import progress

log = logging.getLogger(__name__)

TASKS = ("auto", "causal-lm", "causal-lm-with-past", "feature-extraction", "sequence-classification")
MODES = ("merged", "in-graph", "inputs", "external")
DTYPES = ("fp32", "fp16")
MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = suffix_for("onnx_adapter")
# Weights above this size go to model.onnx.data (protobuf refuses files over 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30



# --------------------------------------------------------------------------------------------
# Recognising what we were given
# --------------------------------------------------------------------------------------------


def _architecture(model: Any) -> str:
    return type(transformers_model(model)).__name__


def task_for_architecture(architecture: str) -> str | None:
    """Map a class name (``LlamaForCausalLM``, ``BertModel``) to a task, or None if unknown."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm-with-past"
    if architecture.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if architecture.endswith(("Model", "ForMaskedLM", "ForPreTraining")):
        return "feature-extraction"
    return None


def resolve_task(task: str, architecture: str, source: str = "model", from_folder: bool = False) -> str:
    """Check ``task`` against the model's architecture; ``auto`` picks one like Optimum does.

    A folder holding a bare encoder (``BertModel``) can still be loaded for
    sequence-classification: the head comes new, or from the adapters' modules_to_save.
    """
    if task not in TASKS:
        raise OnnxPeftError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    natural = task_for_architecture(architecture)
    if task == "auto":
        if natural is None:
            raise OnnxPeftError(
                f"{source}: cannot infer the task from architecture {architecture!r}; pass "
                "task='causal-lm', 'causal-lm-with-past', 'feature-extraction' or 'sequence-classification'"
            )
        return natural
    if task.startswith("causal-lm") and natural != "causal-lm-with-past":
        raise OnnxPeftError(f"{source}: task {task!r} needs a causal LM head, but the model is {architecture}")
    head_can_be_added = from_folder and natural == "feature-extraction"
    if task == "sequence-classification" and natural != "sequence-classification" and not head_can_be_added:
        raise OnnxPeftError(
            f"{source}: task 'sequence-classification' needs a *ForSequenceClassification model, "
            f"but the model is {architecture}"
        )
    return task


def _auto_class(task: str, architecture: str) -> Any:
    import transformers

    if task.startswith("causal-lm"):
        return transformers.AutoModelForCausalLM
    if task == "sequence-classification":
        return transformers.AutoModelForSequenceClassification
    # feature-extraction: load the checkpoint's own class so module paths (bert.encoder...)
    # match adapters trained on it; the backbone is taken at forward time.
    cls = getattr(transformers, architecture, None)
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel


def load_model_dir(model_dir: str | os.PathLike, task: str = "auto",
                   num_labels: int | None = None) -> tuple[Any, str]:
    """Load a local transformers folder (config.json + weights) in fp32, eval mode.

    Returns ``(model, task)`` with ``task`` resolved. Never touches the network.
    ``num_labels`` (sequence-classification only): the head size the adapters were trained
    with; when it differs from the folder's, the base head is re-initialised at that size
    (the adapters bring their own head, see :func:`adapter_num_labels`).
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such model folder; pass a transformers folder with config.json")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelFileError(
                f"{path} is a PEFT adapter folder; pass the base model folder and the adapter with "
                "--adapter (adapters={'name': dir} in Python)"
            )
        raise ModelFileError(f"{path}: config.json not found; is this a transformers model folder?")
    require_torch()
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError("exporting needs transformers: pip install onnx-peft[torch]") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}/config.json: cannot be read by transformers ({exc})") from exc
    archs = getattr(config, "architectures", None) or [""]
    task = resolve_task(task, archs[0], source=str(path), from_folder=True)
    cls = _auto_class(task, archs[0])
    extra: dict[str, Any] = {}
    if task == "sequence-classification" and num_labels and num_labels != getattr(config, "num_labels", None):
        log.warning("%s has %s labels, the adapters %d: its head is re-initialised with %d outputs "
                    "(the adapters' own heads replace it)", path, getattr(config, "num_labels", "?"),
                    num_labels, num_labels)
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    quantized = getattr(config, "quantization_config", None)
    if quantized is not None:  # a 4-bit checkpoint saved by transformers: loaded as it is, never re-quantized
        extra["device_map"] = "cpu"
        _require_bitsandbytes(path)
    try:
        with _quiet_warnings():
            model = cls.from_pretrained(path, local_files_only=True, **extra)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: transformers could not load the weights as {getattr(cls, '__name__', cls)} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if quantized is not None:  # its float parts go to fp32; the packed codes stay as saved
        torch = require_torch()
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return model.eval(), task
    return model.float().eval(), task


def _require_bitsandbytes(path: Path) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"{path} is a bitsandbytes-quantized checkpoint (quantization_config in "
                                     "config.json); loading it needs bitsandbytes: pip install bitsandbytes") from exc


# --------------------------------------------------------------------------------------------
# Running the exporter
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Loggers that narrate every rewrite at INFO; our own log line says what matters.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch._dynamo")


@contextlib.contextmanager
def _exporter_output() -> Iterator[None]:
    """Keep torch.onnx's step prints (stdout), warnings and INFO logs out of the user's way.

    The prints go to our debug log; loggers are restored afterwards.
    """
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _quiet_warnings(), contextlib.redirect_stdout(buffer):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if buffer.getvalue():
            log.debug(buffer.getvalue().rstrip())


def weight_bytes(module: Any) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def run_exporter(model: Any, spec: ExportSpec, path: Path, opset: int | None = None,
                 external_data: bool = False) -> str:
    """Trace ``model`` with ``spec`` and write ``path``; returns "dynamo" or "torchscript"."""
    torch = require_torch()
    from .graph.io import save_model

    module = _task_module_class()(model, spec.forward)
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    try:
        with _exporter_output(), torch.no_grad():
            program = torch.onnx.export(module, spec.args, dynamo=True, optimize=True, verbose=False,
                                        dynamic_shapes=spec.dynamic_shapes(), **common)
        save_model(program.model, path, external_data=external_data)
        return "dynamo"
    except OnnxPeftError:
        raise
    except Exception as exc:
        first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.warning("torch.onnx dynamo export failed (%s); falling back to the TorchScript exporter", first)
    try:
        import onnx_ir as ir

        with _exporter_output(), torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            raw = Path(tmp) / MODEL_FILE
            torch.onnx.export(module, spec.args, str(raw), dynamo=False, dynamic_axes=spec.dynamic_axes(),
                              **common)
            save_model(ir.load(raw), path, external_data=external_data)
    except Exception as exc:
        raise ExportError(
            f"exporting {type(model).__name__} failed with both torch.onnx exporters "
            f"(dynamo: {first}; TorchScript: {type(exc).__name__}: {exc}); try another task or "
            "transformers version, or run with --debug for the traceback"
        ) from exc
    diff = check_outputs(module, spec, path)
    atol = _FALLBACK_CHECK_ATOL.get(str(next(model.parameters()).dtype), 1e-4)
    if diff is not None and not diff <= atol:
        raise ExportError(
            f"the TorchScript exporter (used because dynamo failed: {first}) wrote a model whose "
            f"outputs differ from PyTorch by {diff:.3g}; it cannot export {type(model).__name__} "
            "with this transformers version. Fix the dynamo failure (--debug shows it)"
        )
    return "torchscript"


# A gross-error gate for the TorchScript fallback (which silently mis-traces some transformers
# 5.x models), not a parity claim: tests hold dynamo exports to 1e-5.
_FALLBACK_CHECK_ATOL = {"torch.float32": 1e-4, "torch.float16": 1e-2, "torch.bfloat16": 1e-1}


def check_outputs(module: Any, spec: ExportSpec, path: Path) -> float | None:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch on the traced example inputs.

    None when onnxruntime is not installed (the check is then skipped with a warning).
    """
    torch = require_torch()
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed; %s is not checked against PyTorch", path)
        return None
    import numpy as np

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {n: a.numpy() for n, a in zip(spec.input_names, spec.args) if n in names}
    got = session.run(spec.output_names, feeds)
    with torch.no_grad():
        want = spec.forward(module._wrapped, *spec.args)
    return max(float(np.abs(g.astype(np.float32) - w.float().numpy()).max()) for g, w in zip(got, want))


def _io_info(model_path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)

    def describe(values: Any) -> list[dict]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                        "shape": shape})
        return out

    initializers = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    return describe(inputs), describe(proto.graph.output)


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def _prepare(model_or_dir: Any, task: str, mode: str, dtype: str,
             adapters: dict[str, Path]) -> tuple[Any, Any, str, str | None]:
    """Returns ``(module to export, peft wrapper or None, task, source dir or None)``.

    The module is a transformers model, possibly with adapter layers inside. A model the
    caller passed in is copied before anything changes it (merge, fp16, new adapter layers).
    """
    torch = require_torch()
    source: str | None = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        source = str(model_or_dir)
        model, task = load_model_dir(model_or_dir, task, num_labels=adapter_num_labels(adapters) if adapters else None)
        owned = True
    elif isinstance(model_or_dir, torch.nn.Module) and hasattr(transformers_model(model_or_dir), "config"):
        model = model_or_dir
        task = resolve_task(task, _architecture(model), source=type(transformers_model(model)).__name__)
        owned = False
    else:
        raise OnnxPeftError(
            f"cannot export a {type(model_or_dir).__name__}; pass a transformers model folder, a "
            "transformers model, or a PeftModel"
        )
    peft = model if is_peft_model(model) else None
    if mode in ("in-graph", "merged") and len(adapters) > 1:
        raise AdapterConfigError(
            f"mode {mode!r} exports one adapter, got {len(adapters)} ({', '.join(adapters)}); "
            "use mode='inputs' or 'external' to serve several adapters from one model"
        )
    if adapters:
        if not owned:
            model, owned = copy.deepcopy(model), True
        if mode in ("inputs", "external") and peft is None:
            peft = slot_model(model, adapters)
        else:
            peft = attach_adapters(model, adapters)
    if mode == "merged" and peft is not None:
        if not owned:
            peft, owned = copy.deepcopy(peft), True
        inner = peft.merge_and_unload()
        peft = None
    else:
        inner = transformers_model(peft if peft is not None else model)
    if mode in ("inputs", "external") and peft is None:
        raise AdapterConfigError(
            f"mode {mode!r} needs adapter branches to extract; pass a PeftModel or adapters={{name: dir}}"
        )
    if dtype == "fp16":
        if not owned:
            inner = copy.deepcopy(inner)
        inner = inner.half()
    return inner, peft, task, source


def _check_output_dir(output_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    resolved = output_dir.resolve()
    for item in inputs:
        if Path(item).resolve() == resolved:
            raise UnsafePathError(f"{output_dir} is also an input folder; choose another output folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise UnsafePathError(f"{output_dir} exists and is not a folder; choose another output folder")


def _install(tmp: Path, output_dir: Path) -> None:
    """Move the finished files of ``tmp`` into ``output_dir``, each with one rename."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    fresh = {p.name for p in _model_files(tmp)}
    for stale in _model_files(output_dir):  # data files of an earlier export would mislead
        if stale.name not in fresh:
            os.remove(stale)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_FILE):  # model.onnx last
        target = output_dir / entry.name
        if entry.is_dir():
            target.mkdir(exist_ok=True)
            for child in entry.iterdir():
                os.replace(child, target / child.name)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)


def _extract(model_path: Path, mode: str, full_weights: tuple[list[str], list[str]] = ([], [])) -> Path:
    """Replace the in-graph ``model_path`` by its extracted form; returns the adapter file
    holding the tensors that were in the graph (the exported adapter, in slot layout)."""
    try:
        from .passes.extract_adapters import extract_adapters
    except ImportError as exc:
        raise MissingDependencyError(
            f"mode {mode!r} needs onnx_peft.passes.extract_adapters, which this install lacks"
        ) from exc
    staging = model_path.parent / ".extracted"
    staging.mkdir()
    new_model, adapter_file = extract_adapters(model_path, staging, make_inputs=mode == "inputs",
                                               external=mode == "external", full_weight_modules=full_weights[0],
                                               full_weight_biases=full_weights[1])
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():  # the model and every data file it refers to
        if entry != Path(adapter_file):
            os.replace(entry, model_path.parent / entry.name)
    return Path(adapter_file)


def _insert(model_path: Path, adapters: Mapping[str, Path]) -> dict[str, str]:
    """Replace the base ``model_path`` by the slot model InsertAdapters makes for ``adapters``;
    their files go to ``adapters/``. Returns ``{name: relative adapter file}``."""
    from .passes.insert_adapters import insert_adapters

    staging = model_path.parent / ".inserted"
    insert_adapters(model_path, adapters, staging)
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, model_path.parent / entry.name)
    return {name: f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}" for name in adapters}


def _model_files(folder: Path) -> list[Path]:
    """``model.onnx`` and its data files (``model.onnx.data``, ``model.onnx.adapter.data``...)."""
    return [p for p in folder.glob(MODEL_FILE + "*") if p.name == MODEL_FILE or p.name.startswith(MODEL_FILE + ".")]


def _convert(adapters: Mapping[str, Path], model_path: Path) -> dict[str, str]:
    from .convert import convert_adapters

    folder = model_path.parent / ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    written = {}
    for name, path in progress(adapters.items(), desc="convert adapters", total=len(adapters)):
        convert_adapters(path, model_path, output_path=folder / f"{name}{ADAPTER_SUFFIX}")
        written[name] = f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}"
    return written


@contextlib.contextmanager
def _float_bases(module: Any) -> Iterator[dict]:
    """quant.trace.float_bases when the model has quantized layers (torch is loaded by then)."""
    from .quant.layers import is_quantized_linear

    if not any(is_quantized_linear(m) for m in module.modules()):
        yield {}
        return
    from .quant.trace import float_bases

    with float_bases(module) as states:
        yield states


def _exact_quantizer(states: Mapping[str, Any], quantize: str | None) -> Any:
    """QuantizeBase writing a 4-bit model's own states; ``quantize`` must agree or be None."""
    from .passes.quantize_base import QuantizeBase

    kinds = sorted({s.quant_type for s in states.values()})
    if quantize is not None and kinds != [quantize]:
        raise AdapterConfigError(f"the model is already quantized ({', '.join(kinds)}); export it without "
                                 f"quantize={quantize!r} to keep the codes it was trained on")
    return QuantizeBase.from_states(states)


def _quantize(model_path: Path, quantize: Any) -> None:
    """Replace the exported ``model_path`` by its 4-bit form (QuantizeBase: base Linears become
    MatMulBnb4/MatMulNBits); adapter branches stay float, so extract/insert run after it."""
    from .graph.io import load_model, save_model

    staging = model_path.parent / ".quantized"
    model = load_model(model_path)
    quantize(model)
    save_model(model, staging / MODEL_FILE)
    del model  # no lazy tensor may read the old files once they are gone
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, model_path.parent / entry.name)
    staging.rmdir()


def export(model_or_dir: Any, output_dir: str | os.PathLike, adapters: AdapterSpec = None,
           task: str = "auto", mode: str = "in-graph", dtype: str = "fp32", opset: int | None = None,
           quiet: bool = False, external_data: bool | None = None, quantize: str | None = None,
           double_quant: bool = False, block_size: int = 64) -> Path:
    """Export ``model_or_dir`` to ``output_dir/model.onnx`` and return that path.

    ``model_or_dir``: a local transformers folder, a transformers model, or a PeftModel (ours
    or Hugging Face's). ``adapters``: PEFT adapter folders, ``{name: dir}`` or a list (named
    by folder); modes in-graph/merged take one, inputs/external any number (the model gets a
    slot on every module any of them targets, a full-weight slot on every Linear they train in
    full (``modules_to_save``, e.g. a classifier head; sequence-classification models are loaded
    with the adapters' number of labels), and each is written to ``adapters/NAME.onnx_adapter``). ``external_data``: None decides by size (> 1 GB).
    ``quantize``: ``"nf4"``/``"fp4"`` (bitsandbytes codes, ``double_quant`` as bitsandbytes') or
    ``"int4"`` with ``block_size``: the base Linears (not lm_head) become 4-bit ONNX Runtime
    contrib MatMuls after export, adapter branches and slots stay float (passes.quantize_base).
    A model passed in is never changed; the output appears only when complete.
    """
    if mode not in MODES:
        raise OnnxPeftError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise OnnxPeftError(f"unknown dtype {dtype!r}; choose fp32 or fp16")
    quantizer = None
    if quantize is not None:  # checked before anything is loaded
        from .passes.quantize_base import QuantizeBase

        quantizer = QuantizeBase(quantize, block_size, double_quant)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    named = normalize_adapters(adapters)
    inputs = list(named.values()) + ([model_or_dir] if isinstance(model_or_dir, (str, os.PathLike)) else [])
    _check_output_dir(output_dir, inputs)
    inserted = mode in ("inputs", "external") and bool(named) and needs_insert(named)
    if inserted and mode == "external":
        raise AdapterConfigError("mode 'external' serves LoRA adapters only; export these adapters "
                                 "(another method, or DoRA) with mode='inputs' or 'merged'")
    steps = ["load", "export", "extract", "convert"] if mode in ("inputs", "external") else ["load", "export"]
    bar = iter(steps if quiet else progress(steps, desc="onnx-peft export", total=len(steps)))
    next(bar, None)
    if inserted:  # export the plain base, then graft each method's branch (InsertAdapters)
        module, peft, task, source = _prepare(model_or_dir, task, "in-graph", dtype, {})
    else:
        module, peft, task, source = _prepare(model_or_dir, task, mode, dtype, named)
    # heads the adapters train in full become full-weight slots (default: the base head)
    full_weights = full_weight_modules(module, named) if named and mode in ("inputs", "external") \
        and not inserted else ([], [])
    heads = saved_heads(module) if not named and mode in ("inputs", "external") else {}
    if heads:  # a PeftModel's own trained heads: base head in the graph, trained one in its file
        full_weights = _head_slots(heads)
    training = {m: m.training for m in module.modules()}  # restored afterwards, layer by layer
    module.eval()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        spec = export_spec(module, task)
        if external_data is None:
            external_data = weight_bytes(module) > EXTERNAL_DATA_BYTES
        next(bar, None)
        model_path = tmp / MODEL_FILE
        with _base_heads(module, heads), _float_bases(module) as states:
            exporter = run_exporter(module, spec, model_path, opset, external_data)
        if states:  # a 4-bit (QLoRA) base: its own codes, not a second quantization
            quantizer = _exact_quantizer(states, quantize)
        if quantizer is not None:
            # heads trained in full stay float: their weights become full-weight slots
            quantizer.skip = tuple(quantizer.skip) + tuple(full_weights[0])
            _quantize(model_path, quantizer)
        written: dict[str, str] = {}
        if inserted:
            next(bar, None)
            written = _insert(model_path, named)
            next(bar, None)
        elif mode in ("inputs", "external"):
            next(bar, None)
            extracted = _extract(model_path, mode, full_weights)
            if heads:
                _write_trained_heads(extracted, model_path, heads)
            next(bar, None)
            if named:  # the graph held placeholder weights; convert the real adapters
                written = _convert(named, model_path)
            else:  # a PeftModel came with its own adapter: keep what was extracted
                active = getattr(peft, "active_adapter", None) or "default"
                name = active if isinstance(active, str) else active[0]
                (tmp / ADAPTER_DIR).mkdir()
                target = tmp / ADAPTER_DIR / f"{name}{extracted.suffix}"
                os.replace(extracted, target)
                written = {name: f"{ADAPTER_DIR}/{target.name}"}
            shutil.rmtree(tmp / ".extracted", ignore_errors=True)
        info_inputs, info_outputs = _io_info(model_path)
        info = {
            "task": task, "mode": mode, "dtype": dtype, "opset": opset, "exporter": exporter,
            "quantize": None if quantizer is None else {"quant_type": quantize, "block_size": block_size,
                                                        "double_quant": double_quant},
            "architecture": type(module).__name__, "model_type": getattr(module.config, "model_type", None),
            "source": source, "external_data": (tmp / (MODEL_FILE + ".data")).exists(),
            "adapters": written if written else sorted(named),
            "inputs": info_inputs, "outputs": info_outputs,
            **{k: v for k, v in spec.info.items() if k != "output_dims"},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for layer, flag in training.items():
            layer.training = flag
        for _ in bar:
            pass
    seconds = time.perf_counter() - started
    if not quiet:
        log.info("exported %s (%s, %s, %s) to %s in %.1f s", type(module).__name__, task, mode, exporter,
                 output_dir / MODEL_FILE, seconds)
    return output_dir / MODEL_FILE
