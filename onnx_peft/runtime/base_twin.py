"""The base twin: runs without an adapter execute exactly the base graph's kernels (strategy "slots").

A slot model with no adapter fed still launches its zero-rank branch kernels (3 per LoRA site:
~3.6 us each on an H200, 1.12x the base at prefill; field notes). The twin is a second ONNX
Runtime session over the same model with every slot branch dropped (graph/drop_slots), used for
runs with no adapter (MultiAdapter: every row id 0). Both sessions are given the *same* weight
OrtValues through ``SessionOptions.add_initializer``, which ONNX Runtime uses in place when they
already live on the session's device, so the twin costs no second copy of the weights on a GPU::

    model file --(read once)--> OrtValues on the device --+--> slot session (adapters)
                                                          +--> twin (no adapter): the base kernels

On the CPU provider each session pre-packs its MatMul weights itself, so a twin there would hold
a second packed copy; it is off by default on CPU (``base_session=True`` turns it on) where the
zero-rank branches cost <= 3% anyway (BENCHMARKS.md).

Not built for prompt-ready models (their prompt inputs feed the base graph itself) or
MultiAdapter models whose full-weight banks the graph gathers from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir


@dataclass
class BaseTwin:
    model: ir.Model                   # the base graph, initializers still referencing the file
    weights: dict[str, np.ndarray]    # every initializer it shares with the slot model


def base_twin(model_path: Path) -> BaseTwin | None:
    """The twin of the slot model at ``model_path``, or None when it has nothing to drop or
    cannot run without the session's managed inputs."""
    from ..graph.banks import MULTI_ADAPTER_KEY, MultiLayout
    from ..graph.contract import read_contract
    from ..graph.io import load_model
    from ..graph.packing import read_packing
    from ..graph.sites import remove_dead
    from ..passes.drop_slots import drop_slots
    from ..prompt_feeds import PromptLayout

    model = load_model(model_path)
    metadata = model.metadata_props
    contract = read_contract(metadata)
    if contract is None or not contract.slots or PromptLayout.from_metadata(metadata) is not None:
        return None
    managed = {s.name for s in contract.slots}
    if MULTI_ADAPTER_KEY in metadata:
        layout = MultiLayout.from_json(metadata[MULTI_ADAPTER_KEY])
        managed |= {b.bank for b in layout.banks} | {layout.ids_input}
    for group in (read_packing(metadata) or {}).values():
        managed |= {group["data"], group["sizes"]}
    drop_slots(model)
    graph = model.graph
    for value in list(graph.inputs):
        if value.name in managed:
            if value.uses():  # a full-weight bank the graph gathers rows from
                return None
            graph.inputs.remove(value)
    remove_dead(graph, list(graph))
    weights = {name: value.const_value.numpy() for name, value in graph.initializers.items()
               if value.const_value is not None}
    return BaseTwin(model, weights)
