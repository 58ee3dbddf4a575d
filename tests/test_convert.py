"""convert-adapters: PEFT dirs (and Olive-style slot files) -> slot files that fit a model."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from test_insert_adapters import TOL, build_case, build_inserted, run_logits

from onnx_peft.convert import convert_adapters, peft_to_slots
from onnx_peft.errors import IncompatibleAdapterError
from onnx_peft.formats import fingerprints_match, load_adapter_file, save_adapter_file
from onnx_peft.graph.contract import read_contract
from onnx_peft.methods.lora import LoraConfig
from onnx_peft.passes.insert_adapters import insert_adapters


def test_slot_tensors_fold_the_per_module_scale():
    """A^T [in, r] and (s B)^T [r, out], s from rank_pattern / alpha_pattern / rsLoRA."""
    rng = np.random.default_rng(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2},
                        alpha_pattern={"v": 6}, use_rslora=True)
    peft = {"base_model.model.l.0.q.lora_A.weight": rng.normal(size=(4, 16)),
            "base_model.model.l.0.q.lora_B.weight": rng.normal(size=(8, 4)),
            "base_model.model.l.0.v.lora_A.weight": rng.normal(size=(2, 16)),
            "base_model.model.l.0.v.lora_B.weight": rng.normal(size=(8, 2))}
    slots = peft_to_slots(config, peft, "fp16")
    assert slots["l.0.q.lora_A.weight"].shape == (16, 4) and slots["l.0.q.lora_A.weight"].dtype == np.float16
    for module, scale in (("q", 8 / math.sqrt(4)), ("v", 6 / math.sqrt(2))):
        a, b = peft[f"base_model.model.l.0.{module}.lora_A.weight"], peft[f"base_model.model.l.0.{module}.lora_B.weight"]
        np.testing.assert_allclose(slots[f"l.0.{module}.lora_A.weight"], a.T.astype(np.float16))
        np.testing.assert_allclose(slots[f"l.0.{module}.lora_B.weight"], (scale * b).T.astype(np.float16), rtol=1e-3)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".onnx_adapter"])
def test_converted_peft_dir_reproduces_the_peft_forward(tmp_path, suffix):
    case = build_case("llama")
    model = build_inserted("llama") / "model.onnx"
    path = convert_adapters(case.adapters["patterned"], model, output_path=tmp_path / f"a{suffix}")
    tensors, fingerprint = load_adapter_file(path)
    contract = read_contract(ir.load(model).metadata_props)
    assert fingerprint and fingerprints_match(fingerprint, contract.fingerprint)
    got = run_logits(model, case.input_ids, feeds=tensors)
    assert np.abs(got - case.logits["patterned"]).max() <= TOL


def test_olive_style_slot_file_passes_through_and_is_checked(tmp_path):
    """A file named like `olive convert-adapters` writes it (no fingerprint) is validated, then works."""
    case = build_case("llama")
    model = build_inserted("llama") / "model.onnx"
    tensors, _ = load_adapter_file(convert_adapters(case.adapters["other"], output_path=tmp_path / "o.npz"))
    olive = save_adapter_file(tmp_path / "olive.safetensors", tensors)  # no fingerprint
    out = convert_adapters(olive, model, output_path=tmp_path / "olive.onnx_adapter")
    got = run_logits(model, case.input_ids, adapter_file=out)
    assert np.abs(got - case.logits["other"]).max() <= TOL

    name = "model.layers.0.self_attn.k_proj.lora_B.weight"
    bad = dict(tensors, **{name: np.ascontiguousarray(tensors[name].T)})  # not transposed: [out, r]
    save_adapter_file(tmp_path / "bad.safetensors", bad)
    with pytest.raises(IncompatibleAdapterError, match=name.replace(".", r"\.") + ".*shape"):
        convert_adapters(tmp_path / "bad.safetensors", model, output_path=tmp_path / "bad.onnx_adapter")
    assert not (tmp_path / "bad.onnx_adapter").exists()


def test_inconsistent_rank_dims_are_named(tmp_path):
    case = build_case("llama")
    model = build_inserted("llama") / "model.onnx"
    tensors, _ = load_adapter_file(convert_adapters(case.adapters["other"], output_path=tmp_path / "o.npz"))
    name = "model.layers.1.self_attn.o_proj.lora_B.weight"
    tensors[name] = tensors[name][:2]
    save_adapter_file(tmp_path / "bad.npz", tensors)
    with pytest.raises(IncompatibleAdapterError, match="o_proj"):
        convert_adapters(tmp_path / "bad.npz", model, output_path=tmp_path / "x.npz")


def test_adapter_for_another_base_or_missing_slot_is_refused(tmp_path):
    case = build_case("llama")
    model = build_inserted("llama") / "model.onnx"
    tensors, _ = load_adapter_file(convert_adapters(case.adapters["other"], output_path=tmp_path / "o.npz"))
    save_adapter_file(tmp_path / "foreign.onnx_adapter", tensors, fingerprint="f" * 32)
    with pytest.raises(IncompatibleAdapterError, match="another base model"):
        convert_adapters(tmp_path / "foreign.onnx_adapter", model, output_path=tmp_path / "x.npz")

    only_patterned = insert_adapters(case.base_onnx, {"p": case.adapters["patterned"]}, tmp_path / "p")
    with pytest.raises(IncompatibleAdapterError, match=r"k_proj\.lora_A\.weight' matches no slot"):
        convert_adapters(case.adapters["other"], only_patterned, output_path=tmp_path / "x.npz")


def test_dtype_must_match_the_model(tmp_path):
    case = build_case("llama")
    model = build_inserted("llama") / "model.onnx"
    with pytest.raises(IncompatibleAdapterError, match="float16.*float32"):
        convert_adapters(case.adapters["other"], model, output_path=tmp_path / "x.npz", dtype="fp16")
    tensors, _ = load_adapter_file(convert_adapters(case.adapters["other"], output_path=tmp_path / "h.npz",
                                                    dtype="fp16"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}


def test_dora_factor_is_precomputed_into_the_extracted_dora_slot(tmp_path):
    """PeftModel(DoRA) export -> ExtractAdapters -> convert the PEFT dir: matches PEFT's forward."""
    import copy

    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from test_insert_adapters import _export, _tiny

    from onnx_peft.passes.extract_adapters import extract_adapters

    base = _tiny("llama")
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)).eval()
    with torch.no_grad():  # give DoRA a magnitude that is not just the base norm
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand_like(param))
    peft_model.save_pretrained(str(tmp_path / "dora"))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits.numpy()
    _export(peft_model.base_model.model, tmp_path / "model.onnx", ids)
    model, _ = extract_adapters(tmp_path / "model.onnx", tmp_path / "extracted", make_inputs=True)
    assert any(s.method == "dora" for s in read_contract(ir.load(model).metadata_props).slots)

    path = convert_adapters(tmp_path / "dora", model, output_path=tmp_path / "dora.npz")
    tensors, _ = load_adapter_file(path)
    assert any(name.endswith("dora_factor") for name in tensors)
    got = run_logits(model, ids.numpy(), feeds=tensors)
    assert np.abs(got - want).max() <= TOL
