"""InsertAdapters: PEFT adapter dirs grafted onto base ONNX exports match the PEFT forward.

The tiny models and adapters are built once per process by ``build_case`` (also used by
test_convert.py and test_inspect.py).
"""

from __future__ import annotations

import atexit
import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_peft.errors import CheckpointError, IncompatibleAdapterError
from onnx_peft.formats import load_adapter_file
from onnx_peft.graph.contract import read_contract
from onnx_peft.passes.insert_adapters import InsertAdapters, insert_adapters

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# -- fixtures: tiny transformers models, exported base, PEFT adapters --------------------------
@dataclass
class Case:
    """A base model exported to ONNX plus PEFT adapters trained on it (random, non-zero B)."""

    folder: Path
    base_onnx: Path
    input_ids: np.ndarray
    base_logits: np.ndarray
    adapters: dict[str, Path] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # PEFT forward per adapter


def _tiny(kind: str, seed: int = 0, hidden: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                             max_position_embeddings=64, use_cache=False)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _export(model, path: Path, input_ids) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(model, (input_ids,), str(path), dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], verbose=False,
                          dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})


def _save_adapter(model, folder: Path, input_ids, seed: int, **lora_kwargs) -> np.ndarray:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    with torch.no_grad():
        return peft_model(input_ids=input_ids).logits.numpy()


_TMP = Path(tempfile.mkdtemp(prefix="onnx_peft_insert_"))
atexit.register(shutil.rmtree, _TMP, True)

ADAPTER_SPECS = {
    "llama": {
        # rank_pattern + alpha_pattern + rsLoRA: every module has its own scale
        "patterned": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, use_rslora=True),
        "other": dict(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj"]),
    },
    "gpt2": {
        "conv1d": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    },
}


@functools.cache
def build_case(kind: str) -> Case:
    """Export ``kind`` ("llama" or "gpt2") as a base model and save its PEFT adapters."""
    import torch

    folder = _TMP / kind
    folder.mkdir()
    model = _tiny(kind)
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    _export(model, folder / "base.onnx", input_ids)
    with torch.no_grad():
        case = Case(folder, folder / "base.onnx", input_ids.numpy(), model(input_ids=input_ids).logits.numpy())
    for i, (name, spec) in enumerate(ADAPTER_SPECS[kind].items()):
        case.adapters[name] = folder / name
        case.logits[name] = _save_adapter(model, folder / name, input_ids, seed=10 + i, **spec)
    return case


@functools.cache
def build_inserted(kind: str) -> Path:
    """``insert`` of all adapters of ``kind`` in slots mode: the deploy dir."""
    case = build_case(kind)
    insert_adapters(case.base_onnx, case.adapters, case.folder / "deploy")
    return case.folder / "deploy"


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(path: Path, input_ids: np.ndarray, feeds: dict | None = None, adapter_file: Path | None = None):
    import onnxruntime as ort

    sess = session(path)
    run_options = None
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)
    return sess.run(["logits"], {"input_ids": input_ids, **(feeds or {})}, run_options)[0]


# -- end to end -------------------------------------------------------------------------------
def test_llama_slots_match_peft_forward_with_rank_alpha_patterns_and_rslora():
    case = build_case("llama")
    deploy = build_inserted("llama")
    model = deploy / "model.onnx"

    no_adapter = run_logits(model, case.input_ids)
    assert np.abs(no_adapter - case.base_logits).max() <= TOL

    for name in case.adapters:
        file = deploy / "adapters" / f"{name}.onnx_adapter"
        tensors, _ = load_adapter_file(file)
        fed = run_logits(model, case.input_ids, feeds=tensors)
        active = run_logits(model, case.input_ids, adapter_file=file)
        assert np.abs(case.logits[name] - case.base_logits).max() > 1e-2  # the adapter does something
        assert np.abs(fed - case.logits[name]).max() <= TOL
        assert np.abs(active - case.logits[name]).max() <= TOL


def test_slots_are_optional_inputs_recorded_in_the_contract():
    deploy = build_inserted("llama")
    model = ir.load(deploy / "model.onnx")
    contract = read_contract(model.metadata_props)
    names = {slot.name for slot in contract.slots}
    # union of both adapters: patterned (q, v, down) and other (k, o), 2 layers, A and B each
    assert len(names) == 2 * 2 * 5
    a = model.graph.initializers["model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert a in model.graph.inputs and a.const_value.shape == (64, 0)
    assert [str(d) for d in a.shape] == ["64", "lora_r.model.layers.0.self_attn.v_proj"]
    slot = contract.slot_map()["model.layers.1.mlp.down_proj.lora_B.weight"]
    assert slot.shape == ("lora_r.model.layers.1.mlp.down_proj", 64) and slot.dtype == "float32" and slot.module == "model.layers.1.mlp.down_proj"
    _, fingerprint = load_adapter_file(deploy / "adapters" / "patterned.onnx_adapter")
    assert fingerprint.startswith("ort31:") and contract.fingerprint


def test_gpt2_conv1d_fan_in_fan_out_slots_and_in_graph():
    case = build_case("gpt2")
    deploy = build_inserted("gpt2")
    want = case.logits["conv1d"]
    assert np.abs(run_logits(deploy / "model.onnx", case.input_ids) - case.base_logits).max() <= TOL
    got = run_logits(deploy / "model.onnx", case.input_ids,
                     adapter_file=deploy / "adapters" / "conv1d.onnx_adapter")
    assert np.abs(got - want).max() <= TOL

    baked = insert_adapters(case.base_onnx, {"conv1d": case.adapters["conv1d"]}, case.folder / "baked",
                            mode="in-graph")
    assert not (case.folder / "baked" / "adapters").exists()
    assert np.abs(run_logits(baked, case.input_ids) - want).max() <= TOL


@functools.cache
def build_dora(kind: str = "llama") -> tuple[Path, np.ndarray]:
    """A PEFT DoRA adapter (random A, B and magnitude) on ``kind``'s base: (dir, PEFT logits)."""
    import torch

    case = build_case(kind)
    model = _tiny(kind)  # the same weights as case's base (same seed)
    folder = case.folder / "dora"
    logits = _save_adapter(model, folder, torch.from_numpy(case.input_ids), seed=20, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return folder, logits


def test_llama_dora_inserted_as_slots_and_in_graph_matches_peft_forward():
    case = build_case("llama")
    dora, want = build_dora("llama")
    assert np.abs(want - case.base_logits).max() > 1e-2

    deploy = case.folder / "dora_deploy"
    model = insert_adapters(case.base_onnx, {"dora": dora, "other": case.adapters["other"]}, deploy)
    contract = read_contract(ir.load(model).metadata_props)
    factor = contract.slot_map()["model.layers.0.self_attn.q_proj.dora_factor"]
    assert factor.shape == (64,) and factor.method == "dora"
    assert "model.layers.0.self_attn.k_proj.dora_factor" not in contract.slot_map()
    assert np.abs(run_logits(model, case.input_ids) - case.base_logits).max() <= TOL  # no feeds = base
    file = deploy / "adapters" / "dora.onnx_adapter"
    tensors, _ = load_adapter_file(file)
    assert tensors["model.layers.1.mlp.down_proj.dora_factor"].shape == (64,)
    assert np.abs(run_logits(model, case.input_ids, feeds=tensors) - want).max() <= TOL
    assert np.abs(run_logits(model, case.input_ids, adapter_file=file) - want).max() <= TOL
    other = run_logits(model, case.input_ids, adapter_file=deploy / "adapters" / "other.onnx_adapter")
    assert np.abs(other - case.logits["other"]).max() <= TOL

    baked = insert_adapters(case.base_onnx, {"dora": dora}, case.folder / "dora_baked", mode="in-graph")
    baked_model = ir.load(baked)
    assert "model.layers.0.self_attn.q_proj.dora_factor" in baked_model.graph.initializers
    assert not [v for v in baked_model.graph.inputs if v.name != "input_ids"]
    assert np.abs(run_logits(baked, case.input_ids) - want).max() <= TOL


def test_gpt2_dora_with_biases_inserted_matches_peft_forward():
    import torch

    case = build_case("gpt2")  # Conv1D: bias Add, reshaped back -> the Sub(y, bias) form
    want = _save_adapter(_tiny("gpt2"), case.folder / "dora", torch.from_numpy(case.input_ids), seed=20, r=4,
                         lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)
    model = insert_adapters(case.base_onnx, {"dora": case.folder / "dora"}, case.folder / "dora_deploy")
    assert np.abs(run_logits(model, case.input_ids) - case.base_logits).max() <= TOL
    got = run_logits(model, case.input_ids, adapter_file=case.folder / "dora_deploy" / "adapters" / "dora.onnx_adapter")
    assert np.abs(got - want).max() <= TOL
    baked = insert_adapters(case.base_onnx, {"dora": case.folder / "dora"}, case.folder / "dora_baked",
                            mode="in-graph")
    assert np.abs(run_logits(baked, case.input_ids) - want).max() <= TOL


def test_insert_never_changes_the_base_model():
    case = build_case("llama")
    digest = hashlib.sha256(case.base_onnx.read_bytes()).hexdigest()
    build_inserted("llama")
    assert hashlib.sha256(case.base_onnx.read_bytes()).hexdigest() == digest


# -- incompatible adapters --------------------------------------------------------------------
def _edit_adapter(src: Path, dst: Path, rename: dict[str, str] | None = None, drop: str | None = None,
                  config: dict | None = None) -> Path:
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if drop and drop in key:
            continue
        for old, new in (rename or {}).items():
            key = key.replace(old, new)
        out[key] = value
    save_file(out, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_of_another_base_names_the_first_mismatch(tmp_path):
    case = build_case("llama")
    other = _tiny("llama", seed=3, hidden=32)
    import torch

    _save_adapter(other, tmp_path / "small", torch.zeros(1, 3, dtype=torch.long), seed=0,
                  r=2, target_modules=["q_proj"])
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.0\.self_attn\.q_proj .*32"):
        insert_adapters(case.base_onnx, {"small": tmp_path / "small"}, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_target_without_a_linear_layer_is_named(tmp_path):
    case = build_case("llama")
    bad = _edit_adapter(case.adapters["other"], tmp_path / "bad", rename={"o_proj": "out_proj"},
                        config={"target_modules": ["k_proj", "out_proj"]})
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.0\.self_attn\.out_proj has no linear"):
        insert_adapters(case.base_onnx, {"bad": bad}, tmp_path / "out")


def test_targeted_module_without_tensors_is_a_checkpoint_error(tmp_path):
    case = build_case("llama")
    bad = _edit_adapter(case.adapters["other"], tmp_path / "bad", drop="layers.1.self_attn.o_proj")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        insert_adapters(case.base_onnx, {"bad": bad}, tmp_path / "out")


# -- the pass on a graph built from text (no torch) -------------------------------------------
def _two_layer_model() -> ir.Model:
    """``y = (x @ fc1.weight) @ fc2.weight``: x [N, 4] -> [N, 5] -> y [N, 3]."""
    rng = np.random.default_rng(1)
    graph = ir.Graph(inputs=[ir.val("x", ir.DataType.FLOAT, ["N", 4])], outputs=[], nodes=[],
                     opset_imports={"": 17}, name="g")
    weights = [ir.Value(name=n, const_value=ir.tensor(rng.normal(size=s).astype(np.float32), name=n))
               for n, s in (("fc1.weight", (4, 5)), ("fc2.weight", (5, 3)))]
    for w in weights:
        graph.register_initializer(w)
    h = graph.append(ir.node("MatMul", [graph.inputs[0], weights[0]])) or graph[-1].outputs[0]
    y = graph.append(ir.node("MatMul", [h, weights[1]])) or graph[-1].outputs[0]
    y.name = "y"
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=9)


def _text_adapter(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"base_model.model.fc2.lora_A.weight": rng.normal(size=(2, 5)).astype(np.float32),
               "base_model.model.fc2.lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc2"]}))
    return folder


def test_pass_grafts_a_branch_on_the_graph_output(tmp_path):
    model = _two_layer_model()
    result = InsertAdapters({"a": _text_adapter(tmp_path / "a")})(model)
    assert result.modified
    graph = result.model.graph
    assert [v.name for v in graph.outputs] == ["y"]
    assert graph.outputs[0].producer().op_type == "Add"
    assert [n.op_type for n in graph][-3:] == ["MatMul", "MatMul", "Add"]
    assert {v.name for v in graph.inputs} == {"x", "fc2.lora_A.weight", "fc2.lora_B.weight"}


# -- deploy without PyTorch -------------------------------------------------------------------
NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_formats_convert_insert_inspect_work_without_torch(tmp_path):
    case = build_case("llama")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_TORCH)
    script = textwrap.dedent(f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        from onnx_peft.passes.insert_adapters import insert_adapters
        from onnx_peft.convert import convert_adapters
        from onnx_peft.inspect import inspect_path
        from onnx_peft.formats import load_adapter_file
        out = insert_adapters({str(case.base_onnx)!r}, {{"a": {str(case.adapters['patterned'])!r}}}, {str(tmp_path / 'out')!r})
        file = convert_adapters({str(case.adapters['patterned'])!r}, out, output_path={str(tmp_path / 'a.npz')!r})
        tensors, fingerprint = load_adapter_file(file)
        assert inspect_path(out)["slots"] and inspect_path(file)["modules"]
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
        print("OK", len(tensors))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK 12"


def test_insert_into_a_graph_without_intermediate_types(tmp_path):
    """TorchScript/Optimum exports leave intermediate values untyped; grafting must not need them."""
    import onnx

    case = build_case("llama")
    proto = onnx.load(str(case.base_onnx))
    del proto.graph.value_info[:]
    untyped = tmp_path / "untyped" / "base.onnx"
    untyped.parent.mkdir()
    onnx.save(proto, str(untyped), save_as_external_data=True, location="base.onnx.data")
    name = next(iter(case.adapters))
    insert_adapters(untyped, {name: case.adapters[name]}, tmp_path / "deploy")
    file = tmp_path / "deploy" / "adapters" / f"{name}.onnx_adapter"
    tensors, _ = load_adapter_file(file)
    fed = run_logits(tmp_path / "deploy" / "model.onnx", case.input_ids, feeds=tensors)
    assert np.abs(fed - case.logits[name]).max() <= TOL
