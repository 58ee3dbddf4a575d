"""``onnx-peft run RECIPE``: run a JSON pass recipe (see onnx_peft.recipes)."""

from __future__ import annotations

import argparse

from ..recipes import shipped_recipes
from .args import add_overwrite, parse_named_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE",
                        help="recipe .json file, or a shipped recipe's name (paths then relative to the "
                             f"current folder): {', '.join(shipped_recipes())}")
    parser.add_argument("--model", metavar="MODEL", help="input model (overrides the recipe's input_model)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT adapter dir (repeatable; overrides the recipe's adapters)")
    parser.add_argument("--data", metavar="FILE", help="training data file for LoRA steps")
    parser.add_argument("-o", "--output-dir", "--output", dest="output_dir", metavar="OUT_DIR",
                        help="output folder (overrides the recipe's output_dir)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from ..recipes import run_recipe

    state = run_recipe(args.recipe, model=args.model, adapters=parse_named_paths(args.adapter) or None,
                       output_dir=args.output_dir, data=args.data, overwrite=args.overwrite)
    for line in state.log:
        print(line)
    for name, path in state.adapter_files.items():
        print(f"adapter {name}: {path}")
    return 0
