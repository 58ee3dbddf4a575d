"""The graph passes on decoders exported by Optimum (optimum-onnx's ``main_export``).

Optimum exports with the TorchScript exporter: weights are unnamed (``onnx::MatMul_N``) and
intermediate values may carry no type, so module paths come from node names and structure.
optimum-onnx pins transformers < 4.58, so these tests run in an environment with Optimum
installed (transformers 4.57) and are skipped where it is not (CI, transformers 5.x).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("optimum.exporters.onnx", reason="optimum-onnx is not installed (it needs transformers < 4.58)")
ort = pytest.importorskip("onnxruntime")

import onnx_ir as ir  # noqa: E402
from optimum.exporters.onnx import main_export  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from onnx_peft.graph.modules import find_linear_sites  # noqa: E402
from onnx_peft.graph.sites import find_adapter_branches  # noqa: E402
from onnx_peft.passes import extract_adapters  # noqa: E402
from onnx_peft.passes.insert_adapters import insert_adapters  # noqa: E402

VOCAB, ATOL = 64, 1e-5
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = [p.split(".")[1] for p in PROJECTIONS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, its PEFT LoRA dir, and Optimum's with-past export."""
    root = tmp_path_factory.mktemp("optimum")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).eval().save_pretrained(root / "base")
    torch.manual_seed(1)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(root / "adapter")  # base_model_name_or_path = root / "base"
    main_export(str(root / "base"), output=str(root / "onnx"), task="text-generation-with-past")
    return root


def _peft_model(root: Path) -> PeftModel:
    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), root / "adapter").eval()


def _feeds(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Optimum's with-past inputs; past length 0 (prefill) unless ``past`` is given."""
    batch, seq = ids.shape
    past_len = 0 if not past else next(iter(past.values())).shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = past[i.name] if past else np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def _ids(batch: int = 2, seq: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(3, VOCAB, size=(batch, seq)).astype(np.int64)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def _session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _with_adapter(adapter_file: Path):
    """RunOptions with the adapter active, and the adapter: RunOptions holds no reference to it,
    so the caller must keep it alive (a collected LoraAdapter is silently not applied)."""
    run_options = ort.RunOptions()
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    run_options.add_active_adapter(adapter)
    return run_options, adapter


def test_linear_sites_of_an_optimum_export_are_module_paths(exported):
    sites = find_linear_sites(ir.load(str(exported / "onnx" / "model.onnx")))
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert expected <= set(sites), sorted(sites)
    assert set(sites) - expected <= {"lm_head"}
    q = sites["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features) == (32, 32)
    assert (sites["model.layers.0.self_attn.k_proj"].out_features, sites["model.layers.0.mlp.up_proj"].out_features) \
        == (16, 64)


def test_peft_adapter_inserted_into_an_optimum_export_matches_peft(exported, tmp_path):
    model_path = insert_adapters(exported / "onnx" / "model.onnx", {"a": exported / "adapter"}, tmp_path)
    session, peft = _session(model_path), _peft_model(exported)
    with_adapter, _adapter = _with_adapter(tmp_path / "adapters" / "a.onnx_adapter")
    ids = _ids()
    want = _torch_logits(peft, ids)
    got = session.run(["logits"], _feeds(session, ids), with_adapter)[0]
    assert np.abs(got - want).max() <= ATOL
    with peft.disable_adapter():
        want_base = _torch_logits(peft, ids)
    assert np.abs(want - want_base).max() > 1e-2  # the adapter does change the output
    assert np.abs(session.run(["logits"], _feeds(session, ids))[0] - want_base).max() <= ATOL

    # decode: prefill 4 tokens, then one token on the returned cache, with the adapter
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, _feeds(session, ids[:, :4]), with_adapter)))
    past = {n.replace("present.", "past_key_values."): v for n, v in outputs.items() if n.startswith("present.")}
    step = session.run(["logits"], _feeds(session, ids[:, 4:], past), with_adapter)[0]
    assert np.abs(step[:, -1] - want[:, -1]).max() <= ATOL


def test_optimum_export_of_an_unmerged_peft_model_extracts_to_peft_parity(exported, tmp_path):
    assert json.loads((exported / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(exported / "base")
    # transformers loads the adapter dir (LoRA layers injected, not merged); Optimum cannot
    # infer the library of an adapter-only folder, so it is named
    main_export(str(exported / "adapter"), output=str(tmp_path / "onnx"), task="text-generation-with-past",
                library_name="transformers")
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(find_adapter_branches(ir.load(str(tmp_path / "onnx" / "model.onnx")))) == expected

    model_path, adapter_file = extract_adapters(tmp_path / "onnx" / "model.onnx", tmp_path / "extracted")
    session, peft = _session(model_path), _peft_model(exported)
    ids = _ids()
    with_adapter, _adapter = _with_adapter(adapter_file)
    got = session.run(["logits"], _feeds(session, ids), with_adapter)[0]
    assert np.abs(got - _torch_logits(peft, ids)).max() <= ATOL
    with peft.disable_adapter():
        want_base = _torch_logits(peft, ids)
    assert np.abs(session.run(["logits"], _feeds(session, ids))[0] - want_base).max() <= ATOL
