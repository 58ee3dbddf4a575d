"""Train an adapter on local data with ``transformers.Trainer``.

::

    model dir ──load──▶ base model ──get_peft_model──▶ PeftModel (only adapters + heads train)
    data file ──onnx_peft.data──▶ texts, labels ──tokenizer──▶ features
                                                   │
                          Trainer (torchrun / accelerate launch give DDP unchanged)
                                                   ▼
    output_dir/  adapter_config.json + adapter_model.safetensors (PEFT format)
                 labels.json                      (sequence-classification)
                 checkpoint-N/                    (when save_steps is set; resumable)

``training_args`` takes ``transformers.TrainingArguments`` names (the ones Olive uses too):
learning_rate, num_train_epochs, max_steps, per_device_train_batch_size,
gradient_accumulation_steps, warmup_steps, weight_decay, logging_steps, save_steps,
eval_steps, seed, gradient_checkpointing, bf16, fp16, ...

Our PeftModel is not ``peft.PeftModel``, so the Trainer would save and resume it as a full
state dict; :class:`AdapterTrainer` makes checkpoints adapter-only and reloads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .checkpoint import atomic_write_bytes
from .config import AdapterConfig
from .data import LabelMap, TextData, build_label_map, load_text_data
from .errors import AdapterConfigError, DataError, OnnxPeftError
from .methods.base import method_for, method_names
from .model import PeftModel, get_peft_model
from .progress import quiet as env_quiet

LABELS_NAME = "labels.json"
_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
_DEFAULT_ARGS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "logging_steps": 10,
    "seed": 42,
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
}

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` produced: the adapter dir and the numbers to judge it by.

    ``metrics`` holds ``train_loss``, ``train_runtime``, ``global_step`` and, given
    ``eval_data``, ``eval_loss_before/after`` plus ``eval_accuracy_before/after``
    (classification) or ``eval_perplexity_before/after`` (causal-lm).
    """

    adapter_dir: Path
    metrics: dict[str, float]
    global_step: int
    labels: list[str] | None = None


# -- gradient checkpointing ----------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False, **kwargs: Any) -> None:
    """Turn on activation checkpointing so that gradients still reach the adapters.

    With frozen embeddings the checkpointed blocks get inputs without ``requires_grad``; the
    reentrant implementation then drops the adapters' gradients silently. We make the
    embedding output require grad (``enable_input_require_grads``), which fixes both
    implementations, and default to ``use_reentrant=False``. Also turns off the KV cache,
    which checkpointing cannot use.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    options = {"use_reentrant": use_reentrant, **kwargs}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        raise OnnxPeftError(f"{type(base).__name__} does not support gradient checkpointing")
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


# -- the trainer ---------------------------------------------------------------------------
class AdapterTrainer(Trainer):
    """``transformers.Trainer`` that saves and resumes only the adapter of an onnx-peft model.

    Checkpoints (``checkpoint-N/``) and the final save hold ``adapter_config.json`` +
    ``adapter_model.safetensors`` (PEFT format) and ``labels.json``; the Trainer adds its
    optimizer, scheduler and RNG states next to them for ``resume_from_checkpoint``.
    """

    def __init__(self, *args: Any, label_map: LabelMap | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_map = label_map
        # The Trainer inspects forward() to learn about labels and loss kwargs; ours is
        # forward(*args, **kwargs), so ask the wrapped transformers model instead.
        peft_model = self.accelerator.unwrap_model(self.model)
        base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
        if hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = base.accepts_loss_kwargs
        else:
            import inspect

            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)

    def _peft_model(self) -> PeftModel:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            raise OnnxPeftError(f"AdapterTrainer needs an onnx_peft PeftModel, got {type(model).__name__}")
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._peft_model().save_pretrained(output_dir)
        if self.label_map is not None:
            text = json.dumps(self.label_map.to_json(), indent=2) + "\n"
            atomic_write_bytes(Path(output_dir) / LABELS_NAME, text.encode())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint)
        if not (path / "adapter_model.safetensors").is_file():
            raise OnnxPeftError(
                f"{path}: no adapter_model.safetensors; resume_from_checkpoint must name a checkpoint-N "
                "folder written by onnx-peft train"
            )
        peft_model = self.accelerator.unwrap_model(model) if model is not None else self._peft_model()
        peft_model._load_weights(path, peft_model.active_adapter, allow_pickle=False)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


# -- datasets ------------------------------------------------------------------------------
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized texts (+ ``labels`` ids), one dict of int lists per example."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int] | None = None) -> None:
        self.encodings = {k: v for k, v in encodings.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.labels = labels

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def _tokenize(tokenizer: Any, data: TextData, label_map: LabelMap | None, max_length: int) -> TokenizedDataset:
    encodings = tokenizer(data.texts, truncation=True, max_length=max_length)
    labels = label_map.ids(data.labels) if label_map is not None and data.labels is not None else None
    return TokenizedDataset(dict(encodings), labels)


# -- model and config ----------------------------------------------------------------------
def _load_base(model_dir: Path, task: str, label_map: LabelMap | None, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not (model_dir / "config.json").is_file():
        raise OnnxPeftError(f"{model_dir}: not a transformers model directory (no config.json)")
    try:
        if task == "causal-lm":
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        assert label_map is not None
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, num_labels=len(label_map.id2label),
            id2label=dict(enumerate(label_map.id2label)), label2id=label_map.label2id,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxPeftError(f"{model_dir}: cannot load the model for {task}: {first}") from exc


def _load_tokenizer(source: str | os.PathLike | None) -> Any:
    from transformers import AutoTokenizer

    if source is None or not Path(source).is_dir():
        raise OnnxPeftError("no tokenizer: pass tokenizer=... or a model directory that holds one")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise OnnxPeftError(f"{source}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from exc


def _ensure_pad_token(tokenizer: Any, model: nn.Module) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise OnnxPeftError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def _adapter_config(method: str, config: AdapterConfig | dict | None, task: str) -> AdapterConfig:
    if method.lower() not in method_names():
        raise AdapterConfigError(f"unknown method {method!r}; onnx-peft can train: {', '.join(method_names())}")
    peft_type = method.upper()
    if config is None:
        config = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"} if peft_type == "LORA" \
            else {"target_modules": "all-linear"}
    if isinstance(config, dict):
        config = AdapterConfig.from_dict({"peft_type": peft_type, **config}, source="adapter config")
    if config.peft_type != peft_type:
        raise AdapterConfigError(f"method {method!r} needs a {method_for(peft_type).config_class.__name__}, "
                                 f"got {type(config).__name__}")
    task_type = _TASK_TYPES[task]
    if config.task_type not in (None, task_type):
        raise AdapterConfigError(f"adapter config task_type={config.task_type!r} does not fit task {task!r} ({task_type})")
    return dataclasses.replace(config, task_type=task_type, inference_mode=False)


def _upcast_trainable(model: nn.Module) -> None:
    """Half-precision adapters train badly; keep trainable tensors in fp32 (PEFT does too)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _training_arguments(output_dir: Path, user: dict[str, Any], quiet: bool, has_eval: bool, task: str) -> Any:
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for name in user:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; use transformers.TrainingArguments names"
            raise OnnxPeftError(f"training_args: unknown argument {name!r}{hint}")
    args = {**_DEFAULT_ARGS, **user}
    if user.get("save_steps") and "save_strategy" not in user:
        args["save_strategy"] = "steps"
    if user.get("eval_steps") and "eval_strategy" not in user:
        if not has_eval:
            raise OnnxPeftError("training_args: eval_steps needs eval_data")
        args["eval_strategy"] = "steps"
    args.update(
        output_dir=str(output_dir),
        remove_unused_columns=False,  # our forward(*args, **kwargs) would make the Trainer drop every column
        label_names=["labels"],
        disable_tqdm=user.get("disable_tqdm", quiet or not sys.stderr.isatty()),
    )
    if not torch.cuda.is_available():
        args.setdefault("dataloader_pin_memory", False)
        if args.get("fp16"):
            raise OnnxPeftError("training_args: fp16 needs a CUDA GPU; on CPU use bf16")
        if args.get("bf16"):
            args.setdefault("use_cpu", True)  # bf16 autocast on CPU
    if task == "causal-lm":
        args.setdefault("prediction_loss_only", True)  # no [batch, seq, vocab] logits piling up in eval
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError, ImportError) as exc:
        raise OnnxPeftError(f"training_args: {str(exc).strip().splitlines()[0]}") from exc


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' info logs and its own progress bars (weight loading) when quiet."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _accuracy(eval_pred: Any) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _eval_metrics(trainer: Trainer, task: str, suffix: str) -> dict[str, float]:
    raw = trainer.evaluate()
    out = {f"eval_loss_{suffix}": float(raw["eval_loss"])}
    if task == "sequence-classification":
        out[f"eval_accuracy_{suffix}"] = float(raw["eval_accuracy"])
    else:
        out[f"eval_perplexity_{suffix}"] = math.exp(min(raw["eval_loss"], 50.0))
    return out


# -- the public function -------------------------------------------------------------------
def train(model_dir_or_model: str | os.PathLike | nn.Module, data: str | os.PathLike | Sequence[dict],
          output_dir: str | os.PathLike, method: str = "lora", task: str = "sequence-classification",
          text_field: str = "text", label_field: str = "label", config: AdapterConfig | dict | None = None,
          training_args: dict[str, Any] | None = None, eval_data: str | os.PathLike | Sequence[dict] | None = None,
          resume_from_checkpoint: str | os.PathLike | bool | None = None, quiet: bool = False,
          tokenizer: Any = None, max_length: int = 512, quantize: dict[str, Any] | None = None) -> TrainResult:
    """Train a ``method`` adapter on ``data`` and write it to ``output_dir`` in PEFT format.

    ``model_dir_or_model``: a transformers model directory (with its tokenizer), a
    transformers model, or an onnx-peft ``PeftModel`` to keep training (then ``config`` is
    ignored). ``data``/``eval_data``: a .jsonl/.json/.csv/.txt file or a list of dicts.
    For ``sequence-classification`` the head trains fully (``modules_to_save``) and the
    label names go to ``output_dir/labels.json``. ``quantize``: QLoRA, the base's linear layers
    quantized first (``onnx_peft.quantize_model`` arguments, e.g. ``{"quant_type": "nf4"}``).
    ``resume_from_checkpoint``: a
    ``checkpoint-N`` folder of an earlier run, or True for the latest one in ``output_dir``.
    Runs unchanged under ``torchrun``/``accelerate launch`` (DDP); only rank 0 writes.
    """
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, set_seed

    quiet = quiet or env_quiet()
    output_dir = Path(output_dir)
    user_args = dict(training_args or {})
    checkpointing, checkpoint_kwargs = _pop_checkpointing(user_args)

    train_data = load_text_data(data, task, text_field, label_field)
    eval_text = load_text_data(eval_data, task, text_field, label_field) if eval_data is not None else None
    label_map = build_label_map(train_data, eval_text) if task == "sequence-classification" else None
    args = _training_arguments(output_dir, user_args, quiet, eval_text is not None, task)
    checkpoint = _checkpoint_path(resume_from_checkpoint, output_dir)

    with _quiet_transformers(quiet):
        set_seed(args.seed)
        model = _prepare_model(model_dir_or_model, method, config, task, label_map, quantize)
        if tokenizer is None:
            source = model_dir_or_model if not isinstance(model_dir_or_model, nn.Module) else getattr(
                getattr(model, "config", None), "_name_or_path", None)
            tokenizer = _load_tokenizer(source)
        _ensure_pad_token(tokenizer, model)
        if checkpointing:
            enable_gradient_checkpointing(model, **checkpoint_kwargs)

        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_length = min(max_length, positions) if isinstance(positions, int) else max_length
        train_set = _tokenize(tokenizer, train_data, label_map, max_length)
        eval_set = _tokenize(tokenizer, eval_text, label_map, max_length) if eval_text is not None else None
        collator = (DataCollatorWithPadding(tokenizer) if task == "sequence-classification"
                    else DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer = AdapterTrainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
            compute_metrics=_accuracy if task == "sequence-classification" else None, label_map=label_map,
        )
        if quiet:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)

        metrics: dict[str, float] = {}
        if eval_set is not None and checkpoint is None:
            metrics.update(_eval_metrics(trainer, task, "before"))
        output = trainer.train(resume_from_checkpoint=checkpoint)
        metrics.update(train_loss=float(output.training_loss), global_step=float(output.global_step),
                       train_runtime=float(output.metrics.get("train_runtime", 0.0)))
        if eval_set is not None:
            metrics.update(_eval_metrics(trainer, task, "after"))
        trainer.save_model(str(output_dir))
    return TrainResult(output_dir, metrics, int(output.global_step), label_map.id2label if label_map else None)


def _pop_checkpointing(user_args: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Take (gradient|activation)_checkpointing out of the Trainer's hands: we enable it ourselves."""
    flags = [bool(user_args.pop(name, False)) for name in ("gradient_checkpointing", "activation_checkpointing")]
    kwargs: dict[str, Any] = {}
    for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        value = user_args.pop(name, None)
        kwargs.update(json.loads(value) if isinstance(value, str) else value or {})
    return any(flags), kwargs


def _checkpoint_path(resume: str | os.PathLike | bool | None, output_dir: Path) -> str | None:
    """The checkpoint-N folder to resume from: as given, or the latest in ``output_dir`` for True."""
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise OnnxPeftError(f"{output_dir}: no checkpoint-N folder to resume from")
        return last
    if not Path(resume).is_dir():
        raise OnnxPeftError(f"{resume}: checkpoint folder not found")
    return str(resume)


def _prepare_model(model_or_dir: str | os.PathLike | nn.Module, method: str, config: AdapterConfig | dict | None,
                   task: str, label_map: LabelMap | None, quantize: dict[str, Any] | None = None) -> PeftModel:
    if isinstance(model_or_dir, PeftModel):
        model = model_or_dir
        if label_map is not None:
            _check_num_labels(model, label_map)
        model.peft_config[model.active_adapter].inference_mode = False
        model.set_adapter(model.active_adapter)  # makes the adapter trainable again
        return model
    adapter_config = _adapter_config(method, config, task)
    if isinstance(model_or_dir, nn.Module):
        base = model_or_dir
        if label_map is not None:
            _check_num_labels(base, label_map)
    else:
        base = _load_base(Path(model_or_dir), task, label_map, torch.float32)
    if quantize:  # QLoRA: a 4/8-bit base (onnx_peft.quantize_model), frozen and prepared as PEFT does
        from .quant.layers import prepare_model_for_kbit_training, quantize_model

        skip = ("lm_head", "classifier", "score")  # heads stay float (they train in full for SEQ_CLS)
        base = prepare_model_for_kbit_training(quantize_model(base, skip_modules=skip, **quantize),
                                               use_gradient_checkpointing=False)
    model = get_peft_model(base, adapter_config)
    _upcast_trainable(model)
    return model


def _check_num_labels(model: nn.Module, label_map: LabelMap) -> None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and num_labels != len(label_map.id2label):
        raise DataError(
            f"the model has {num_labels} labels but the data has {len(label_map.id2label)} "
            f"({label_map.id2label}); build the model with num_labels={len(label_map.id2label)}"
        )
    if config is not None:
        config.id2label = dict(enumerate(label_map.id2label))
        config.label2id = label_map.label2id
