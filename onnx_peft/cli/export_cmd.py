"""``onnx-peft export MODEL_DIR [--adapter [NAME=]DIR ...] -o OUT_DIR``: a thin call of
:func:`onnx_peft.export.export`.
"""

from __future__ import annotations

import argparse

from .args import add_overwrite, parse_named_paths

_TASKS = ("auto", "causal-lm", "causal-lm-with-past", "feature-extraction", "sequence-classification")
_MODES = ("merged", "in-graph", "inputs", "external")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local transformers model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]ADAPTER_DIR",
                        help="PEFT adapter folder (repeatable; NAME defaults to the folder name)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                        help="output folder: model.onnx, export_info.json, adapters/")
    parser.add_argument("--task", choices=_TASKS, default="auto",
                        help="model signature (default: from config.architectures)")
    parser.add_argument("--mode", choices=_MODES, default="in-graph",
                        help="what happens to adapters (default: in-graph)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="weights and activations of the exported model (default: fp32)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int4"), default=None,
                        help="4-bit base: nf4/fp4 (bitsandbytes codes, MatMulBnb4) or int4 (MatMulNBits); "
                             "adapters stay float")
    parser.add_argument("--double-quant", action="store_true",
                        help="nf4/fp4: bitsandbytes double quantization of the block absmax values")
    parser.add_argument("--block-size", type=int, default=64, help="4-bit block size (default: 64)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from ..export import export

    path = export(args.model_dir, args.output, adapters=parse_named_paths(args.adapter) or None,
                  task=args.task, mode=args.mode, dtype=args.dtype, opset=args.opset,
                  quiet=bool(getattr(args, "quiet", False)), quantize=args.quantize,
                  double_quant=args.double_quant, block_size=args.block_size, overwrite=args.overwrite)
    if not getattr(args, "quiet", False):
        print(path)
    return 0
