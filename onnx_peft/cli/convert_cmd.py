"""``onnx-peft convert-adapters --adapter DIR [--model MODEL.onnx] -o FILE [--dtype fp32|fp16]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR_OR_FILE",
                        help="PEFT adapter directory, or a slot file (ours or olive convert-adapters')")
    parser.add_argument("--model", metavar="MODEL.onnx",
                        help="model with adapter slots: check the adapter against it, record its fingerprint")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="adapter file: .onnx_adapter, .safetensors or .npz")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "float32", "float16"],
                        help="tensor dtype (default: the model's slots, else fp32)")
    parser.add_argument("--format", choices=["onnx_adapter", "safetensors", "npz"],
                        help="file format (default: from the output suffix)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read adapter_model.bin (pickle: only for files you trust)")


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_adapters

    path = convert_adapters(args.adapter, args.model, output_path=args.output, dtype=args.dtype,
                            format=args.format, allow_pickle=args.allow_pickle)
    print(f"wrote {path}")
    return 0
