"""Insert PEFT adapters into an ONNX model that was exported elsewhere, without PyTorch in the loop.

The base model is exported "by someone else" with plain ``torch.onnx.export(dynamo=True)``;
``insert_adapters`` then finds its Linear layers by graph structure, grafts adapter slots onto
the ones the PEFT folder targets and writes each adapter as ``adapters/NAME.onnx_adapter``.
LoRA matrices only: a head trained in full (modules_to_save, as in the `make demo` adapters)
needs a model with a slot for it, i.e. ``export(..., mode="inputs")`` (see swap_adapters.py).

    python examples/insert_into_base.py [--work-dir DIR]
"""

from __future__ import annotations

import common


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.example_parser(__doc__)
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from onnx_peft import AdapterSession, insert_adapters

    work = common.work_dir(args.work_dir)
    base_dir, adapters = common.base_and_adapters(work, head=False)
    feeds = common.encode(base_dir)
    want = {name: common.peft_logits(base_dir, folder, feeds) for name, folder in adapters.items()}

    # 1. elsewhere: a plain base model export, knowing nothing about adapters
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=next(iter(want.values())).shape[-1])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(model.eval(), tuple(torch.from_numpy(feeds[n]) for n in names), work / "base.onnx", dynamo=True,
                      input_names=names, output_names=["logits"], dynamic_shapes=[{0: batch, 1: seq}] * 3, verbose=False)

    # 2. here: graft slots for every adapter onto it, then swap adapters per run
    path = insert_adapters(work / "base.onnx", adapters, work / "inserted", overwrite=True)
    session = AdapterSession(path)
    results = {}
    for name in adapters:
        session.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
        (got,) = session.run(["logits"], common.only_inputs(feeds, session.input_names), adapter=name)
        results[f"max_abs_diff_{name}"] = float(np.abs(got - want[name]).max())
        print(f"adapter {name!r} inserted: ORT vs PyTorch max |logit diff| {results[f'max_abs_diff_{name}']:.2e}")
    return results


if __name__ == "__main__":
    main()
