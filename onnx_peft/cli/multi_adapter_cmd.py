"""``onnx-peft multi-adapter MODEL.onnx -o OUT_DIR``: per-row adapter banks for mixed batches."""

from __future__ import annotations

import argparse

from .args import add_overwrite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="model with adapter slots (from extract/insert/export)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the new model.onnx")
    parser.add_argument("--ids-input", default="adapter_ids", metavar="NAME",
                        help="name of the [batch] int64 input of per-row adapter ids (default: adapter_ids)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from ..passes.multi_adapter import multi_adapter

    path = multi_adapter(args.model, args.output, ids_input=args.ids_input, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
