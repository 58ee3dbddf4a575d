"""Export a transformers model, a PeftModel, or a folder of either, to ONNX.

Why this module exists: the graph passes (merge, extract, multi-adapter) need an ONNX model
whose adapter branches are still recognisable, and users need one call that goes from a
trained adapter to a deploy folder::

    OUT_DIR/model.onnx              (+ model.onnx.data when the weights exceed ~1 GB)
    OUT_DIR/export_info.json        task, mode, dtype, exporter, inputs, outputs, adapters
    OUT_DIR/adapters/NAME.onnx_adapter   (modes "inputs" / "external" only)

The exporter is ``torch.onnx.export(dynamo=True)`` with its optimizer on; the TorchScript
exporter is tried only when dynamo fails. The module path of every layer stays recoverable:
the exported module shares its children with the transformers model (see ``_TaskModule`` in :mod:`.spec`),
so each node's ``pkg.torch.onnx.name_scopes`` ends in the real path
(``model.layers.0.self_attn.q_proj.lora_A.default``) and each pre-transposed weight records
its parameter in ``pkg.onnxscript.optimizer.folded_from``. Both are kept.

Tasks and their signatures (all ints are int64; dims named as in the graph)::

    causal-lm                input_ids, attention_mask [batch, sequence] -> logits [batch, sequence, vocab]
    causal-lm-with-past      + position_ids [batch, sequence],
                             past_key_values.N.key/value [batch, kv_heads, past_sequence, head_dim]
                             -> logits, present.N.key/value [batch, kv_heads, past_sequence + sequence, head_dim]
                             (attention_mask is [batch, total_sequence]; past_sequence = 0 is prefill)
    feature-extraction       input_ids, attention_mask (, token_type_ids) -> last_hidden_state [batch, sequence, hidden]
    sequence-classification  input_ids, attention_mask (, token_type_ids) -> logits [batch, num_labels]

Modes: ``in-graph`` keeps the adapter branches with their weights as initializers; ``merged``
folds the adapter into the base weights first (same nodes as the base export); ``inputs`` /
``external`` export in-graph and then move adapter tensors out of the graph
(:mod:`onnx_peft.passes.extract_adapters`), writing each given adapter as a slot file.

torch and transformers are imported inside functions only: ``import onnx_peft`` stays torch-free.
This package never imports ``peft``; PEFT models are recognised by their attributes.

Layout: :mod:`.loading` (task, model folder), :mod:`.spec` (what is traced per task),
:mod:`.adapters` / :mod:`.heads` (adapter folders, full-weight heads), :mod:`.exporter`
(torch.onnx), :mod:`.steps` (extract, insert, convert, quantize), :mod:`.output` (folder
layout, atomic install), :mod:`.api` (:func:`export`).
"""

from __future__ import annotations

from .adapters import (
    AdapterSpec,
    attach_adapters,
    is_peft_model,
    needs_insert,
    normalize_adapters,
    slot_model,
    transformers_model,
    union_targets,
)
from .api import DTYPES, MODES, export
from .exporter import check_outputs, run_exporter, weight_bytes
from .heads import adapter_num_labels, full_weight_modules, saved_heads
from .loading import TASKS, load_model_dir, resolve_task, task_for_architecture
from .output import ADAPTER_DIR, ADAPTER_SUFFIX, EXTERNAL_DATA_BYTES, INFO_FILE, MODEL_FILE
from .spec import ExportSpec, cache_tensors, export_spec, make_cache

__all__ = [
    "ADAPTER_DIR", "ADAPTER_SUFFIX", "DTYPES", "EXTERNAL_DATA_BYTES", "INFO_FILE", "MODEL_FILE", "MODES",
    "TASKS", "AdapterSpec", "ExportSpec", "adapter_num_labels", "attach_adapters", "cache_tensors",
    "check_outputs", "export", "export_spec", "full_weight_modules", "is_peft_model", "load_model_dir",
    "make_cache", "needs_insert", "normalize_adapters", "resolve_task", "run_exporter", "saved_heads",
    "slot_model", "task_for_architecture", "transformers_model", "union_targets", "weight_bytes",
]
