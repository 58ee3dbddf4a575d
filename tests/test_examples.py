"""The scripts in examples/ run end to end on tiny seeded models and print the numbers they promise.

Each example's ``main([...])`` returns the numbers it printed; here they are held to account.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path: Path, *args: str) -> dict:
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = importlib.import_module(name)
        return module.main(["--work-dir", str(tmp_path), *args])
    finally:
        sys.path.remove(str(EXAMPLES))


def test_train_lora_lowers_the_loss_and_trains_few_params(tmp_path):
    out = run_example("train_lora", tmp_path, "--epochs", "8")
    assert 0 < out["trainable_params"] < out["total_params"] / 2
    assert out["loss_after"] < out["loss_before"] - 0.1
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_export_merged_matches_pytorch(tmp_path):
    assert run_example("export_merged", tmp_path)["max_abs_diff"] <= 1e-5


def test_swap_adapters_each_matches_pytorch(tmp_path):
    out = run_example("swap_adapters", tmp_path)
    assert out["max_abs_diff_a"] <= 1e-5 and out["max_abs_diff_b"] <= 1e-5
    assert out["adapter_effect"] > 1e-3


def test_insert_into_a_plain_dynamo_export_matches_pytorch(tmp_path):
    out = run_example("insert_into_base", tmp_path)
    assert set(out) == {"max_abs_diff_a", "max_abs_diff_b"}
    assert max(out.values()) <= 1e-5


def test_multi_adapter_rows_equal_each_row_alone(tmp_path):
    assert run_example("multi_adapter_batch", tmp_path)["max_abs_diff"] <= 1e-5


def test_generate_with_adapter_equals_peft_generate(tmp_path):
    out = run_example("generate_with_adapter", tmp_path, "--new-tokens", "8")
    assert out["match"] and out["ort_tokens"] == out["torch_tokens"]
    assert len(out["ort_tokens"]) == 5 + 8
    assert out["ort_tokens"] != out["base_tokens"]  # the adapter changes what is generated
