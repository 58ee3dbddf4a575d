"""``onnx-peft train MODEL_DIR --data FILE --task ... -o ADAPTER_DIR``: a thin call of ``onnx_peft.training``.

Runs unchanged under DDP: ``torchrun --nproc_per_node N --no-python onnx-peft train ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import OnnxPeftError
from ..methods.base import method_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="transformers model directory (with its tokenizer)")
    parser.add_argument("--method", default="lora", choices=method_names(), type=str.lower,
                        help="adapter method, any PEFT method onnx-peft has (default: lora)")
    parser.add_argument("--data", required=True, metavar="FILE", help="training data: .jsonl, .json, .csv or .txt")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm"],
                        help="what the model learns (default: sequence-classification)")
    parser.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    parser.add_argument("--label-field", default="label", help="field holding the label (default: label)")
    parser.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR",
                        help="where the adapter (PEFT format) and checkpoint-N folders go")
    parser.add_argument("--config", metavar="ADAPTER.json",
                        help="adapter config: the method's PEFT config fields, e.g. {\"r\": 16, \"target_modules\": \"all-linear\"}")
    parser.add_argument("--training-args", metavar="ARGS.json",
                        help="transformers.TrainingArguments names, e.g. {\"learning_rate\": 2e-4, \"max_steps\": 100}")
    parser.add_argument("--eval-data", metavar="FILE", help="evaluation data, same format and fields as --data")
    parser.add_argument("--resume-from-checkpoint", metavar="DIR", help="a checkpoint-N folder of an earlier run")
    parser.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens (default: 512)")


def _read_json(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OnnxPeftError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OnnxPeftError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OnnxPeftError(f"{path}: {what} must be a JSON object")
    return data


def run(args: argparse.Namespace) -> int:
    from ..errors import require_torch

    require_torch()
    from ..training import train

    result = train(
        args.model_dir, args.data, args.output, method=args.method, task=args.task, text_field=args.text_field,
        label_field=args.label_field, config=_read_json(args.config, "adapter config"),
        training_args=_read_json(args.training_args, "training args"), eval_data=args.eval_data,
        resume_from_checkpoint=args.resume_from_checkpoint, quiet=bool(getattr(args, "quiet", False)),
        max_length=args.max_length,
    )
    figures = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
    print(f"wrote {result.adapter_dir} ({figures})")
    return 0
