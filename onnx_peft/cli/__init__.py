"""The ``onnx-peft`` command: one table of subcommands, each a thin call of a public function.

Each subcommand lives in ``onnx_peft/cli/<name>.py`` and defines ``add_arguments(parser)``
and ``run(args) -> int``. Exit codes: 0 ok, 1 failure (an OnnxPeftError, printed as one line),
2 usage. ``--debug`` shows tracebacks; ``--quiet`` hides progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import OnnxPeftError

# name -> (module under onnx_peft.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {}


def register(name: str, module: str, help_text: str) -> None:
    COMMANDS[name] = (module, help_text)


for _name, _module, _help in [
    ("export", "export_cmd", "export a transformers model (and adapters) to ONNX"),
    ("merge", "merge_cmd", "fold adapter branches (or a PEFT adapter dir) into the base weights"),
    ("extract", "extract_cmd", "move adapter tensors out of the graph into inputs or external data"),
    ("insert", "insert_cmd", "graft PEFT adapters onto a base ONNX model"),
    ("convert-adapters", "convert_cmd", "convert a PEFT adapter dir to a file that fits a model's slots"),
    ("inspect", "inspect_cmd", "show slots, ranks, methods and contract of a model or adapter file"),
    ("run", "run_cmd", "run a JSON pass recipe"),
    ("multi-adapter", "multi_adapter_cmd", "turn adapter slots into per-row adapter banks"),
    ("infer", "infer_cmd", "run a model with adapters in ONNX Runtime"),
    ("bench", "bench_cmd", "measure latency of a model with and without adapters"),
    ("train", "train_cmd", "train an adapter on local data"),
]:
    register(_name, _module, _help)


def _available() -> dict[str, tuple[str, str]]:
    here = os.path.dirname(__file__)
    return {n: v for n, v in COMMANDS.items() if os.path.exists(os.path.join(here, v[0] + ".py"))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    # the same flags after the command too (``onnx-peft train ... --quiet``); SUPPRESS keeps a flag
    # given before the command from being reset by the subcommand's default
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    flags.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in _available().items():
        command = importlib.import_module(f"{__name__}.{module}")
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[flags])
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.quiet:
        os.environ["ONNX_PEFT_QUIET"] = "1"
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except OnnxPeftError as exc:
        if args.debug:
            raise
        print(f"onnx-peft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
