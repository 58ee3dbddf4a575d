"""``onnx-peft extract MODEL.onnx -o OUT_DIR``: a thin call of extract_adapters."""

from __future__ import annotations

import argparse

from ..passes.extract_adapters import SAVE_FORMATS, adapter_data_name, extract_adapters
from .args import add_overwrite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="ONNX model with adapter branches in the graph")
    parser.add_argument("-o", "--output-dir", "--output", dest="output_dir", required=True, metavar="OUT_DIR",
                        help="folder for the model (same file name) and its adapter file (<model stem>.<format>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--make-inputs", dest="external", action="store_false",
                      help="adapter tensors become graph inputs, one rank dim per module (default)")
    mode.add_argument("--external", dest="external", action="store_true",
                      help="adapter tensors become initializers stored in <model>.adapter.data; the runtime "
                           "swaps them with SessionOptions.add_external_initializers (same ranks)")
    parser.set_defaults(external=False)
    parser.add_argument("--pack-inputs", action="store_true",
                        help="one flat input per dtype (packed_adapters.<dtype> + .sizes), cut apart in the graph")
    optional = parser.add_mutually_exclusive_group()
    optional.add_argument("--optional-inputs", dest="optional_inputs", action="store_true", default=True,
                          help="inputs default to zero-rank tensors: no feeds = base model (default)")
    optional.add_argument("--no-optional-inputs", "--required-inputs", dest="optional_inputs",
                          action="store_false", help="inputs have no defaults; every run must feed them")
    parser.add_argument("--format", choices=SAVE_FORMATS, default="onnx_adapter",
                        help="adapter file format (default: onnx_adapter)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    model, adapter = extract_adapters(
        args.model, args.output_dir, make_inputs=not args.external, pack_inputs=args.pack_inputs,
        optional_inputs=args.optional_inputs, external=args.external, save_format=args.format,
        overwrite=args.overwrite,
    )
    print(f"model written to {model}\nadapter written to {adapter}")
    if args.external:
        print(f"adapter initializers stored in {model.parent / adapter_data_name(model)}")
    return 0
