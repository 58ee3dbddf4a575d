"""One ONNX model, two adapters: export with adapter slots, then swap adapters per run.

``export(mode="inputs")`` turns every LoRA A/B into an optional graph input (a slot) and writes
each adapter as ``adapters/NAME.onnx_adapter``. One AdapterSession loads both files and picks
one per ``run``; ``adapter=None`` runs the plain base model.

    python examples/swap_adapters.py [--work-dir DIR] [--from-demo demo_output]
"""

from __future__ import annotations

import common


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.example_parser(__doc__, from_demo=True)
    args = parser.parse_args(argv)
    import numpy as np

    from onnx_peft import AdapterSession, export

    work = common.work_dir(args.work_dir)
    base_dir, adapters = common.base_and_adapters(work, args.from_demo)
    path = export(base_dir, work / "slots", adapters=adapters, task="sequence-classification", mode="inputs",
                  overwrite=True)

    session = AdapterSession(path)
    for name in adapters:
        session.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
    feeds = common.encode(base_dir)
    onnx_feeds = common.only_inputs(feeds, session.input_names)
    results = {}
    for name in [*adapters, *adapters]:  # a, b, a, b: swapping back and forth in one session
        (got,) = session.run(["logits"], onnx_feeds, adapter=name)
        results[name] = max(results.get(name, 0.0), float(np.abs(got - common.peft_logits(base_dir, adapters[name], feeds)).max()))
    (base,) = session.run(["logits"], onnx_feeds)  # adapter=None: the slots take their zero-rank defaults
    (last,) = session.run(["logits"], onnx_feeds, adapter=name)
    effect = float(np.abs(last - base).max())
    for name, diff in results.items():
        print(f"adapter {name!r}: ORT vs PyTorch max |logit diff| {diff:.2e}")
    print(f"adapter {name!r} vs no adapter: max |logit change| {effect:.2e} (the swap is not a no-op)")
    return {**{f"max_abs_diff_{n}": d for n, d in results.items()}, "adapter_effect": effect}


if __name__ == "__main__":
    main()
