"""``onnx-peft inspect PATH [--json]``: slots, ranks, methods and contract."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an .onnx model, an adapter file, a PEFT adapter dir or a deploy dir")
    parser.add_argument("--json", action="store_true", help="print the full description as JSON")


def run(args: argparse.Namespace) -> int:
    from ..inspect import inspect_path, render_text

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else render_text(info))
    return 0
