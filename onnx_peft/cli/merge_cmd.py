"""``onnx-peft merge MODEL.onnx [--adapter DIR] -o OUT.onnx``: a thin call of merge_adapters."""

from __future__ import annotations

import argparse

from ..passes.merge_adapters import merge_adapters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model with adapter branches (or a base model with --adapter)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory to merge into the base model")
    parser.add_argument("-o", "--output", required=True, help="output .onnx path (weights go to OUT.onnx.data)")


def run(args: argparse.Namespace) -> int:
    path = merge_adapters(args.model, args.output, adapter_dir=args.adapter)
    print(f"merged model written to {path}")
    return 0
