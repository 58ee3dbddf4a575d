"""``onnx-peft run RECIPE.json``: run a JSON pass recipe (see onnx_peft.recipes)."""

from __future__ import annotations

import argparse

from ..recipes import run_recipe
from .args import parse_named_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file, e.g. passes/extract-inputs.json (or a shipped recipe's name)")
    parser.add_argument("--model", help="input model (overrides the recipe's input_model)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT adapter dir (repeatable; overrides the recipe's adapters)")
    parser.add_argument("--data", help="training data file for LoRA steps")
    parser.add_argument("-o", "--output-dir", help="output folder (overrides the recipe's output_dir)")


def run(args: argparse.Namespace) -> int:
    state = run_recipe(args.recipe, model=args.model, adapters=parse_named_paths(args.adapter) or None,
                       output_dir=args.output_dir, data=args.data)
    for line in state.log:
        print(line)
    for name, path in state.adapter_files.items():
        print(f"adapter {name}: {path}")
    return 0
