"""``onnx-peft merge MODEL.onnx [--adapter DIR] -o OUT``: a thin call of merge_adapters."""

from __future__ import annotations

import argparse

from .args import add_overwrite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx",
                        help="ONNX model with adapter branches (or a base model with --adapter)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder to merge into the base model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx|OUT_DIR",
                        help="a .onnx file (weights in OUT.onnx.data beside it), or a folder that gets model.onnx")
    add_overwrite(parser, "output file or folder")


def run(args: argparse.Namespace) -> int:
    from ..passes.merge_adapters import merge_adapters

    path = merge_adapters(args.model, args.output, adapter_dir=args.adapter, overwrite=args.overwrite)
    print(f"merged model written to {path}")
    return 0
