"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import OnnxPeftError, RuntimeSessionError
from ..formats import ADAPTER_FILE_SUFFIXES
from ..runtime.providers import CPU, DEVICES, parse_option_flags
from ..runtime.strategy import STRATEGIES


def add_overwrite(parser: argparse.ArgumentParser, what: str = "output folder") -> None:
    """``--overwrite``: the one way to write into a non-empty output folder (replaced whole)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {what} whole (default: refuse a non-empty one)")


def session_options(args: argparse.Namespace):
    """ONNX Runtime session options for a CLI session: ORT logs its own copy of an error before
    raising it (and we print the error once), so its log is kept to fatal errors unless --debug."""
    from ..errors import require_onnxruntime

    options = require_onnxruntime().SessionOptions()
    options.log_severity_level = 2 if getattr(args, "debug", False) else 4
    return options


def add_session_flags(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--provider-option``, ``--tf32``, ``--strategy``: the AdapterSession
    arguments, the same on every command that opens a session (infer, bench, serve)."""
    group = parser.add_argument_group("ONNX Runtime session")
    group.add_argument("--device", choices=DEVICES, default="auto",
                       help="where the model runs; auto: CUDA when onnxruntime-gpu has it, else the CPU "
                            "(default: auto)")
    group.add_argument("--provider-option", action="append", default=[], type=_provider_option,
                       metavar="[PROVIDER:]KEY=VALUE",
                       help="an ONNX Runtime execution provider option, checked when the session starts; "
                            "without PROVIDER: it is for cuda (e.g. gpu_mem_limit=4000000000); repeatable")
    group.add_argument("--tf32", action="store_true",
                       help="let CUDA run fp32 MatMuls in TF32: faster, ~1e-3 off PyTorch (default: exact fp32)")
    group.add_argument("--strategy", choices=STRATEGIES, default="auto",
                       help="slots: adapters fed per run (mixed per row on MultiAdapter models); merge: the "
                            "active adapter folded into the weights on swap, one adapter at a time, runs cost "
                            "the base; auto: slots (default: auto)")


def _provider_option(text: str) -> str:
    """argparse ``type``: a malformed ``--provider-option`` is a usage error (exit 2), found
    before any model is read."""
    try:
        parse_option_flags([text])
    except OnnxPeftError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--provider-option ")) from exc
    return text


def session_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The AdapterSession keywords the session flags ask for (see :func:`add_session_flags`).

    An option for a provider ``--device cpu`` does not start (``gpu_mem_limit=...`` is for cuda)
    is refused here, by the flag the user typed; the session would name only the provider."""
    if args.device == "cpu":
        for text in args.provider_option:
            (provider,) = parse_option_flags([text])
            if provider != CPU:
                raise RuntimeSessionError(f"--provider-option {text}: is for {provider} (without PROVIDER: an "
                                          "option is for cuda), which --device cpu does not start; drop it "
                                          "or use --device cuda")
    from ..errors import require_onnxruntime

    cuda = args.device != "cpu" and "CUDAExecutionProvider" in require_onnxruntime().get_available_providers()
    return {"session_options": session_options(args), "device": args.device,
            "provider_options": parse_option_flags(args.provider_option) or None,
            "tf32": args.tf32, "strategy": args.strategy,
            # the options are made fresh for this session, so the base twin may share weights in them
            "base_session": True if cuda else None}


def parse_named_paths(values: list[str]) -> dict[str, str]:
    """``["a=dir1", "x/dir2", "f.onnx_adapter"]`` -> ``{"a": "dir1", "dir2": "x/dir2", "f": ...}``.

    Without ``NAME=`` the name is the folder name (or the adapter file's stem); a ``=`` inside
    a path is not taken for a name. Two entries with one name are refused."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or "\\" in name:
            path = value
            plain = Path(value.rstrip("/\\"))
            name = plain.stem if plain.suffix in ADAPTER_FILE_SUFFIXES else plain.name
        if not name or not path:
            raise OnnxPeftError(f"--adapter {value!r}: expected [NAME=]PATH")
        if name in named:
            raise OnnxPeftError(f"--adapter {value!r}: adapter name {name!r} is used twice; write NAME=PATH")
        named[name] = path
    return named
