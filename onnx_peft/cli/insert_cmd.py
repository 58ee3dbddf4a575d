"""``onnx-peft insert BASE.onnx --adapter [NAME=]DIR ... -o OUT_DIR [--in-graph]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_overwrite, parse_named_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base_model", metavar="BASE.onnx", help="base ONNX model without adapters")
    parser.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                        help="PEFT adapter directory (repeatable); NAME defaults to the folder name")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                        help="writes OUT_DIR/model.onnx and OUT_DIR/adapters/NAME.onnx_adapter")
    parser.add_argument("--in-graph", action="store_true",
                        help="bake one adapter into the graph as initializers instead of slots")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read adapter_model.bin (pickle: only for files you trust)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from ..passes.insert_adapters import insert_adapters

    adapters = parse_named_paths(args.adapter)
    mode = "in-graph" if args.in_graph else "slots"
    path = insert_adapters(args.base_model, adapters, args.output, mode=mode, allow_pickle=args.allow_pickle,
                          overwrite=args.overwrite)
    print(f"wrote {path}" + ("" if args.in_graph else f" and {len(adapters)} adapter file(s) in "
                             f"{Path(args.output) / 'adapters'}"))
    return 0
