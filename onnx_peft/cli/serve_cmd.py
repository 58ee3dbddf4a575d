"""``onnx-peft serve DEPLOY_DIR [--adapter NAME=PATH] [--host H] [--port P]``: an HTTP server.

Loads ``DEPLOY_DIR/model.onnx`` and every ``DEPLOY_DIR/adapters/*.onnx_adapter`` (plus each
``--adapter``), then answers OpenAI-style ``/v1/completions`` (decoders), ``/v1/classify`` or
``/v1/embeddings``, ``/health``, ``/metrics`` and the admin routes. Concurrent requests for
different adapters share one model run (see :mod:`onnx_peft.serve.batcher`).
"""

from __future__ import annotations

import argparse

from .args import add_session_flags, parse_named_paths, session_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("deploy_dir", metavar="DEPLOY_DIR",
                        help="folder written by onnx-peft export (model.onnx, adapters/, export_info.json)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="load another adapter at start (.onnx_adapter, .safetensors or PEFT dir); repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request waits for others to share its run (default: 5)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="rows per model run, and prompts per request at most (default: 16)")
    parser.add_argument("--no-batching", action="store_true",
                        help="run every request alone (for comparison; default: batch across adapters)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                        help="longest prompt accepted, in tokens; longer answers 413 (default: 2048)")
    parser.add_argument("--max-new-tokens", type=int, default=1024,
                        help="largest max_tokens accepted; more answers 413 (default: 1024)")
    parser.add_argument("--eos-token-id", type=int, default=None,
                        help="stop decoding a row at this token (default: the tokenizer's eos_token, if any)")
    parser.add_argument("--one-adapter-per-run", action="store_true",
                        help="keep the model's slots instead of building a MultiAdapter model at start")
    add_session_flags(parser)


def run(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, serve

    config = ServeConfig(max_wait_ms=args.max_wait_ms, max_batch_size=args.max_batch_size,
                         batching=not args.no_batching, max_prompt_tokens=args.max_prompt_tokens,
                         max_new_tokens=args.max_new_tokens)
    print(f"serving {args.deploy_dir} on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(args.deploy_dir, parse_named_paths(args.adapter), host=args.host, port=args.port, config=config,
          mix_adapters=not args.one_adapter_per_run, eos_token_id=args.eos_token_id, **session_kwargs(args))
    return 0
