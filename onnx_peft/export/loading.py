"""Which task a model is exported for, and loading a local transformers folder for it.

Kept apart from tracing so the task rules (``auto`` picks like Optimum) read in one place.
torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, ModelFileError, OnnxPeftError, require_torch
from ..progress import transformers_quiet
from .adapters import transformers_model
from .exporter import _quiet_warnings

log = logging.getLogger(__package__)  # one logger for the export package: "onnx_peft.export"

TASKS = ("auto", "causal-lm", "causal-lm-with-past", "feature-extraction", "sequence-classification")


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
    # a head the adapters bring (or a bare encoder's new head) is expected: no "MISSING" report
    new_head = task == "sequence-classification" and (bool(extra.get("num_labels")) or
                                                      not archs[0].endswith("ForSequenceClassification"))
    try:
        with _quiet_warnings(), transformers_quiet(report=not new_head):
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

