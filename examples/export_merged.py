"""Export a PEFT adapter merged into the base weights, then check ONNX Runtime against PyTorch.

The adapter is loaded with ``PeftModel.from_pretrained`` and handed to ``export(mode="merged")``:
the ONNX model has no adapter ops left, just base weights W + scale * B @ A.

    python examples/export_merged.py [--work-dir DIR] [--from-demo demo_output]
"""

from __future__ import annotations

import common


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.example_parser(__doc__, from_demo=True)
    args = parser.parse_args(argv)
    import numpy as np
    from transformers import AutoModelForSequenceClassification

    from onnx_peft import AdapterSession, PeftModel, export

    work = common.work_dir(args.work_dir)
    base_dir, adapters = common.base_and_adapters(work, args.from_demo)
    name, adapter_dir = next(iter(adapters.items()))
    feeds = common.encode(base_dir)
    want = common.peft_logits(base_dir, adapter_dir, feeds)

    # a PeftModel in memory -> one merged ONNX model (the Python objects are left unchanged)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=want.shape[-1])
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    path = export(peft_model, work / "merged", task="sequence-classification", mode="merged",
                  overwrite=True)

    session = AdapterSession(path)
    (got,) = session.run(["logits"], common.only_inputs(feeds, session.input_names))
    diff = float(np.abs(got - want).max())
    print(f"adapter {name!r} merged into {path}")
    print(f"ORT vs PyTorch max |logit diff|: {diff:.2e}")
    return {"max_abs_diff": diff}


if __name__ == "__main__":
    main()
