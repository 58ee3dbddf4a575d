"""``onnx-peft bench MODEL.onnx --adapter NAME=FILE ...``: latency with and without adapters.

Runs the base and each adapter (and, on MultiAdapter models, a batch mixing all of them)
interleaved in a random order, then prints the median and each one's ratio to the base, so
slow drifts of the machine hit all variants alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..errors import RuntimeSessionError
from .args import add_session_flags, parse_named_paths, session_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="model with adapter slots (or MultiAdapter banks)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                        help="adapter file (or PEFT dir) to time against the base; repeatable")
    parser.add_argument("--batch", type=int, default=1, help="rows per run (default: 1)")
    parser.add_argument("--seq", type=int, default=32, help="sequence length of synthetic inputs")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs and run order")
    add_session_flags(parser)


def run(args: argparse.Namespace) -> int:
    from ..runtime import AdapterSession, example_feeds

    if args.runs < 1 or args.batch < 1 or args.seq < 1:
        raise RuntimeSessionError("--runs, --batch and --seq must be >= 1")
    session = AdapterSession(args.model, **session_kwargs(args))
    variants: dict[str, object] = {"base": None}
    for name, path in parse_named_paths(args.adapter).items():
        session.load_adapter(name, path)
        variants[name] = name
    if session.is_multi_adapter and len(variants) > 1:
        names = [None, *list(variants)[1:]]
        variants["mixed rows"] = [names[i % len(names)] for i in range(args.batch)]
    feeds = example_feeds(session, args.batch, args.seq, args.seed)
    for adapter in variants.values():
        for _ in range(args.warmup):
            session.run(None, feeds, adapter=adapter)
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = np.random.default_rng(args.seed)
    for _ in range(args.runs):
        for key in rng.permutation(list(variants)):
            start = time.perf_counter()
            session.run(None, feeds, adapter=variants[key])
            times[key].append(time.perf_counter() - start)
    base = float(np.median(times["base"]))
    tf32 = " (TF32)" if args.tf32 and session.device == "cuda" else ""
    print(f"{args.model} on {session.provider}{tf32}, strategy {args.strategy}, batch {args.batch}, seq {args.seq}, "
          f"{args.runs} runs each")
    for key, values in times.items():
        median = float(np.median(values))
        print(f"  {key:<20} median {median * 1e3:8.3f} ms   x{median / base:.3f} of base")
    return 0
