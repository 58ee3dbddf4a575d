"""Mix adapters per row in one batch: ``multi_adapter`` turns the adapter slots into banks.

The slot model from ``export(mode="inputs")`` becomes a MultiAdapter model: every loaded adapter
sits in a bank and each batch row picks its own with ``adapter=[name or None per row]``
(plain ONNX Gather + batched MatMul). Each row must equal that row run alone.

    python examples/multi_adapter_batch.py [--work-dir DIR] [--from-demo demo_output]
"""

from __future__ import annotations

import common


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.example_parser(__doc__, from_demo=True)
    args = parser.parse_args(argv)
    import numpy as np

    from onnx_peft import AdapterSession, export, multi_adapter

    work = common.work_dir(args.work_dir)
    base_dir, adapters = common.base_and_adapters(work, args.from_demo)
    slots = export(base_dir, work / "slots", adapters=adapters, task="sequence-classification", mode="inputs",
                   overwrite=True)
    multi = AdapterSession(multi_adapter(slots, work / "multi", overwrite=True))
    single = AdapterSession(slots)
    for name in adapters:
        for session in (multi, single):
            session.load_adapter(name, slots.parent / "adapters" / f"{name}.onnx_adapter")

    feeds = common.only_inputs(common.encode(base_dir), multi.input_names)
    names = [*adapters]
    per_row = [names[i % len(names)] if i % 3 else None for i in range(len(feeds["input_ids"]))]  # None: base
    (mixed,) = multi.run(["logits"], feeds, adapter=per_row)
    alone = np.concatenate([single.run(["logits"], {k: v[i:i + 1] for k, v in feeds.items()}, adapter=name)[0]
                            for i, name in enumerate(per_row)])
    diff = float(np.abs(mixed - alone).max())
    print(f"rows -> adapters: {per_row}")
    print(f"mixed batch vs each row alone: max |logit diff| {diff:.2e}")
    return {"max_abs_diff": diff}


if __name__ == "__main__":
    main()
