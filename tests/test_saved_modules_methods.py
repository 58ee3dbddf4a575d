"""A sequence-classification adapter of another method (its head trained in full, PEFT's
modules_to_save) merges into a base ONNX graph exactly, and insert serves it (full-weight head slots)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import tiny_bert_cls

from onnx_peft import export
from onnx_peft.passes.insert_adapters import insert_adapters
from onnx_peft.passes.merge_adapters import merge_adapters
from onnx_peft.runtime import AdapterSession

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seqcls")
    base = tiny_bert_cls()
    base.save_pretrained(folder / "base")
    config = peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"],
                            feedforward_modules=["intermediate.dense"])
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(folder / "adapter")
    ids = np.random.default_rng(0).integers(1, 60, size=(2, 7)).astype(np.int64)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    base_onnx = export(folder / "base", folder / "base_onnx", task="sequence-classification", quiet=True)
    return folder, base_onnx, ids, expected


def test_merge_applies_method_and_trained_head(setup):
    folder, base_onnx, ids, expected = setup
    merged = merge_adapters(base_onnx, folder / "merged" / "model.onnx", folder / "adapter")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    (logits,) = AdapterSession(merged).run(["logits"], feeds)
    assert np.abs(logits - expected).max() <= 1e-5


def test_insert_serves_the_full_weight_head_as_slots(setup):
    folder, base_onnx, ids, expected = setup
    model = insert_adapters(base_onnx, {"a": folder / "adapter"}, folder / "inserted")
    session = AdapterSession(model)
    assert {"classifier.weight", "classifier.bias"} <= {s.name for s in session.contract.slots}
    session.load_adapter("a", folder / "inserted" / "adapters" / "a.onnx_adapter")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    (logits,) = session.run(["logits"], feeds, adapter="a")
    assert np.abs(logits - expected).max() <= 1e-5
