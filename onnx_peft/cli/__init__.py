"""The ``onnx-peft`` command: one table of subcommands, each a thin call of a public function.

Each subcommand lives in ``onnx_peft/cli/<name>.py`` and defines ``add_arguments(parser)``
and ``run(args) -> int``. Exit codes: 0 ok, 1 failure (printed as one line on stderr, in the
flags the user types: see :mod:`.messages`), 2 usage. ``--debug`` shows tracebacks and ONNX
Runtime's own log; ``--quiet`` hides progress bars and info logs. Both go anywhere on the line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .messages import one_line

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
    ("serve", "serve_cmd", "serve a deploy folder over HTTP, batching requests across adapters"),
]:
    register(_name, _module, _help)


def _available() -> dict[str, tuple[str, str]]:
    here = os.path.dirname(__file__)
    return {n: v for n, v in COMMANDS.items() if os.path.exists(os.path.join(here, v[0] + ".py"))}


GLOBAL_FLAGS = {"--debug": "show tracebacks and ONNX Runtime's own log on errors",
                "--quiet": "no progress bars, info logs or load reports"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-peft", description=__doc__.splitlines()[0],
                                     epilog="--debug and --quiet may also follow the command and its arguments.")
    parser.add_argument("--version", action="version", version=f"onnx-peft {__version__}")
    for flag, help_text in GLOBAL_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    # listed in every command's --help too; main() takes them out of the line wherever they are
    flags = argparse.ArgumentParser(add_help=False)
    for flag, help_text in GLOBAL_FLAGS.items():
        flags.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in _available().items():
        command = importlib.import_module(f"{__name__}.{module}")
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[flags])
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def split_global_flags(argv: Sequence[str]) -> tuple[list[str], set[str]]:
    """``["export", "m", "--quiet", "-o", "x"]`` -> ``(["export", "m", "-o", "x"], {"--quiet"})``.

    Only before a ``--`` separator, so a value after it is never taken for a flag."""
    rest: list[str] = []
    found: set[str] = set()
    for index, token in enumerate(argv):
        if token == "--":
            rest.extend(argv[index:])
            break
        if token in GLOBAL_FLAGS:
            found.add(token)
        else:
            rest.append(token)
    return rest, found


def _quiet_libraries(quiet: bool, debug: bool) -> None:
    """ONNX Runtime logs an error line of its own before raising the same text, which we print;
    keep its log to fatal errors unless --debug, and bitsandbytes' import-time warnings too.
    transformers' bars and reports go with --quiet."""
    if quiet:
        os.environ["ONNX_PEFT_QUIET"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not debug:
        # bitsandbytes warns on import about an optional CPU kernel package nobody asked for
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            import onnxruntime

            onnxruntime.set_default_logger_severity(4)
        except ImportError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    argv, flags = split_global_flags(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    try:
        args = parser.parse_args([*sorted(flags), *argv])
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help / --version
        return int(exc.code or 0)
    _quiet_libraries(args.quiet, args.debug)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except Exception as exc:  # every failure: one line, exit 1; the traceback only with --debug
        if args.debug:
            raise
        print(f"onnx-peft {args.command}: error: {one_line(exc, args.command)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
