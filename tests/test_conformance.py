"""Every method through every ONNX path, against Hugging Face PEFT's forward (fp32, <= 1e-5).

Cases come from ``tests/method_cases/<method>.py`` (one file per method, next to its own
tuner tests) plus LoRA/DoRA below. For each: HF PEFT builds the adapter on a tiny model with
random non-trivial weights and saves it; then, with no PyTorch in the ONNX paths:

    export --mode merged        ORT logits == PEFT's
    merge pass on a base graph  ORT logits == PEFT's
    export --mode inputs        AdapterSession with the PEFT dir and with the .onnx_adapter == PEFT's;
                                no adapter == the base
    insert + convert-adapters   the method's adapter and a LoRA adapter swap in one session
    multi-adapter               rows [method, none, lora] each == its single run (or a clear refusal)
    inspect                     names the branch forms and their slots
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from onnx_peft import export
from onnx_peft.convert import convert_adapters
from onnx_peft.errors import OnnxPeftError
from onnx_peft.inspect import inspect_path
from onnx_peft.passes.insert_adapters import insert_adapters
from onnx_peft.passes.merge_adapters import merge_adapters
from onnx_peft.passes.multi_adapter import multi_adapter
from onnx_peft.runtime import AdapterSession

peft = pytest.importorskip("peft")

TOL = 1e-5
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn"]}


def _cases() -> dict[str, dict]:
    cases = {
        "lora-llama": dict(config="LoraConfig", model="llama", per_row=True,
                           kwargs=dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])),
        "dora-llama": dict(config="LoraConfig", model="llama", per_row=True,
                           kwargs=dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])),
    }
    import method_cases

    for info in pkgutil.iter_modules(method_cases.__path__):
        cases.update(importlib.import_module(f"method_cases.{info.name}").CASES)
    return cases


CASES = _cases()


def _ids(batch: int = 3, seq: int = 6) -> np.ndarray:
    return np.random.default_rng(7).integers(1, 60, size=(batch, seq)).astype(np.int64)


def _peft_adapter(base: torch.nn.Module, config_name: str, kwargs: dict, folder: Path, seed: int) -> torch.nn.Module:
    """A PEFT model with seeded random weights in every trainable tensor, saved to ``folder``."""
    config = getattr(peft, config_name)(**kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    return model


def _logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)
                     ).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    spec = CASES[name]
    folder = tmp_path_factory.mktemp(name)
    base = MODELS[spec["model"]]()
    base.save_pretrained(folder / "base")
    ids = _ids()
    method = _peft_adapter(base, spec["config"], spec["kwargs"], folder / "adapter", seed=1)
    lora = _peft_adapter(base, "LoraConfig", dict(r=2, lora_alpha=4, target_modules=LORA_TARGETS[spec["model"]]),
                         folder / "lora", seed=2)
    export(folder / "base", folder / "base_onnx", task="causal-lm", quiet=True)
    return dict(name=name, spec=spec, folder=folder, ids=ids, expected=_logits(method, ids),
                lora_expected=_logits(lora, ids), base_expected=_logits(base, ids),
                base_onnx=folder / "base_onnx" / "model.onnx")


def _feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _run(session: AdapterSession, ids: np.ndarray, adapter=None) -> np.ndarray:
    return session.run(["logits"], _feeds(ids), adapter=adapter)[0]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


def test_export_merged_equals_peft(case):
    out = export(case["folder"] / "base", case["folder"] / "merged", adapters={"a": case["folder"] / "adapter"},
                 task="causal-lm", mode="merged", quiet=True)
    assert _diff(_run(AdapterSession(out), case["ids"]), case["expected"]) <= TOL


def test_merge_pass_on_base_graph_equals_peft(case):
    out = merge_adapters(case["base_onnx"], case["folder"] / "merge_pass" / "model.onnx", case["folder"] / "adapter")
    assert _diff(_run(AdapterSession(out), case["ids"]), case["expected"]) <= TOL


def test_export_inputs_swaps_adapter_and_runs_base_without(case):
    out = export(case["folder"] / "base", case["folder"] / "inputs", adapters={"a": case["folder"] / "adapter"},
                 task="causal-lm", mode="inputs", quiet=True)
    session = AdapterSession(out)
    session.load_adapter("file", out.parent / "adapters" / "a.onnx_adapter")
    session.load_adapter("dir", case["folder"] / "adapter")
    assert _diff(_run(session, case["ids"], "file"), case["expected"]) <= TOL
    assert _diff(_run(session, case["ids"], "dir"), case["expected"]) <= TOL
    assert _diff(_run(session, case["ids"]), case["base_expected"]) <= TOL


@pytest.fixture(scope="module")
def inserted(case):
    folder = case["folder"] / "inserted"
    model = insert_adapters(case["base_onnx"], {"a": case["folder"] / "adapter", "lora": case["folder"] / "lora"},
                            folder)
    converted = convert_adapters(case["folder"] / "adapter", model, output_path=case["folder"] / "a.safetensors")
    return model, converted


def test_insert_and_convert_swap_method_and_lora_in_one_session(case, inserted):
    model, converted = inserted
    session = AdapterSession(model)
    session.load_adapter("a", converted)
    session.load_adapter("lora", model.parent / "adapters" / "lora.onnx_adapter")
    for _ in range(2):  # swap back and forth: nothing sticks
        assert _diff(_run(session, case["ids"], "a"), case["expected"]) <= TOL
        assert _diff(_run(session, case["ids"], "lora"), case["lora_expected"]) <= TOL
        assert _diff(_run(session, case["ids"]), case["base_expected"]) <= TOL


def test_merge_strategy_swaps_method_and_lora_at_base_cost(case, inserted):
    """strategy="merge": each adapter folded into the weights by ONNX Runtime on swap equals PEFT;
    the base comes back exactly; the session's graph has the base's nodes (no branches)."""
    model, converted = inserted
    if case["name"].startswith(("trainable_tokens", "ln_tuning")):
        with pytest.raises(OnnxPeftError, match="no merged form|not a Linear"):
            AdapterSession(model, strategy="merge")
        return
    session = AdapterSession(model, strategy="merge")
    session.load_adapter("a", converted)
    session.load_adapter("lora", model.parent / "adapters" / "lora.onnx_adapter")
    base = _run(session, case["ids"])
    for _ in range(2):
        assert _diff(_run(session, case["ids"], "a"), case["expected"]) <= TOL
        assert session.active_adapter == "a"
        assert _diff(_run(session, case["ids"], "lora"), case["lora_expected"]) <= TOL
        assert np.array_equal(_run(session, case["ids"]), base)
    assert _diff(base, case["base_expected"]) <= TOL


def test_multi_adapter_rows_equal_single_runs_or_refuse(case, inserted):
    model, converted = inserted
    if not case["spec"]["per_row"]:
        with pytest.raises(OnnxPeftError, match="merge"):
            multi_adapter(model, case["folder"] / "multi")
        return
    session = AdapterSession(multi_adapter(model, case["folder"] / "multi"))
    session.load_adapter("a", converted)
    session.load_adapter("lora", model.parent / "adapters" / "lora.onnx_adapter")
    mixed = _run(session, case["ids"], ["a", None, "lora"])
    assert _diff(mixed[0], case["expected"][0]) <= TOL
    assert _diff(mixed[1], case["base_expected"][1]) <= TOL
    assert _diff(mixed[2], case["lora_expected"][2]) <= TOL


def test_inspect_names_forms_and_method(case, inserted):
    model, _ = inserted
    info = inspect_path(model)
    forms = {slot["method"] for slot in info["slots"]}
    assert "lora" in forms  # the LoRA adapter inserted next to the method's
    peft_info = inspect_path(case["folder"] / "adapter")
    saved = json.loads((case["folder"] / "adapter" / "adapter_config.json").read_text())
    assert peft_info["peft_type"] == saved["peft_type"]
    assert peft_info["modules"]
