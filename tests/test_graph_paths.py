"""Graph paths of issue 12: external-initializer models through AdapterSession (the base without
an adapter, adapters of any rank), insert/merge on a wrapper module's export (``m.model.layers...``),
merge into a slot model, LoRA on grouped convolutions, insert of non-LoRA adapters with a head
trained in full (modules_to_save). Every ONNX output is compared with PEFT's PyTorch forward."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch
from tiny_models import (
    TOL,
    max_diff,
    peft_and_ours,
    perturb_trainable,
    run,
    tiny_bert_cls,
    tiny_llama,
    token_ids,
)
from torch import nn

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.graph.branch import BRANCH_KEY
from onnx_peft.graph.contract import CONTRACT_KEY, FULL_WEIGHT_METHOD
from onnx_peft.graph.io import load_model
from onnx_peft.graph.module_map import map_modules
from onnx_peft.passes import extract_adapters
from onnx_peft.passes.insert_adapters import insert_adapters
from onnx_peft.passes.merge_adapters import merge_adapters
from onnx_peft.runtime import AdapterSession

IDS = token_ids(2, 6)


def _reference(directory=None, build=tiny_llama) -> np.ndarray:
    model = build() if directory is None else peft.PeftModel.from_pretrained(build(), str(directory)).eval()
    return run(model, IDS).numpy()


def _feeds(names) -> dict[str, np.ndarray]:
    ids = IDS.numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in names}


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _raw(path, feeds=None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {**_feeds(names), **(feeds or {})})[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Base folder and two LoRA folders (a: r=4 q/v, b: r=2 q/v/down) with their PEFT logits."""
    root = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for name, r, targets, seed in (("a", 4, ["q_proj", "v_proj"], 1), ("b", 2, ["q_proj", "v_proj", "down_proj"], 2)):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        perturb_trainable(model, seed)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    refs = {"base": _reference(), "a": _reference(dirs["a"]), "b": _reference(dirs["b"])}
    return dirs, refs


# -- 1. external mode -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def external(llama, tmp_path_factory):
    dirs, _ = llama
    return onnx_peft.export(dirs["base"], tmp_path_factory.mktemp("external") / "out",
                            adapters={"a": dirs["a"], "b": dirs["b"]}, task="causal-lm", mode="external", quiet=True)


def test_external_model_runs_the_base_without_an_adapter_and_takes_adapters_of_any_rank(llama, external):
    dirs, refs = llama
    path = external
    assert load_model(path).metadata_props["onnx_peft.contract"].count('"external": true') == 1
    assert _diff(_raw(path), refs["a"]) <= TOL  # as written: the first adapter, not the placeholders
    session = AdapterSession(path)
    feeds = _feeds(session.input_names)
    assert _diff(session.run(["logits"], feeds)[0], refs["base"]) <= TOL  # no adapter = the base
    session.load_adapter("a", path.parent / "adapters" / "a.onnx_adapter")  # the exported rank
    session.load_adapter("b", path.parent / "adapters" / "b.onnx_adapter")  # rank 2 < 4, down_proj too
    session.load_adapter("b_dir", dirs["b"])  # a PEFT folder
    for name, ref in (("a", "a"), ("b", "b"), ("b_dir", "b"), (None, "base")):
        assert _diff(session.run(["logits"], feeds, adapter=name)[0], refs[ref]) <= TOL, name


def test_a_model_whose_slots_are_fixed_initializers_refuses_adapters_in_its_own_terms(llama, wrapped, tmp_path):
    dirs, _ = llama
    ingraph = insert_adapters(wrapped, {"a": dirs["a"]}, tmp_path / "ig", mode="in-graph")
    fixed, adapter = extract_adapters(ingraph, tmp_path / "fixed", make_inputs=False)
    session = AdapterSession(fixed)
    with pytest.raises(IncompatibleAdapterError, match="fixed initializer.*--external"):
        session.load_adapter("x", adapter)


# -- 2. a wrapper module's export -------------------------------------------------------------


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = tiny_llama()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapped") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrapper().eval(), (IDS,), str(path), dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}},
                          verbose=False)
    return path


def test_insert_and_merge_map_a_wrapper_modules_paths(llama, wrapped, tmp_path):
    dirs, refs = llama
    model = insert_adapters(wrapped, {"a": dirs["a"], "b": dirs["b"]}, tmp_path / "ins")
    session = AdapterSession(model)
    assert {s.module for s in session.contract.slots} >= {"m.model.layers.0.mlp.down_proj"}
    session.load_adapter("a", tmp_path / "ins" / "adapters" / "a.onnx_adapter")
    session.load_adapter("b", dirs["b"])
    feeds = _feeds(session.input_names)
    for name, ref in (("a", "a"), ("b", "b"), (None, "base")):
        assert _diff(session.run(["logits"], feeds, adapter=name)[0], refs[ref]) <= TOL, name
    merged = merge_adapters(wrapped, tmp_path / "merged", adapter_dir=dirs["b"])
    assert _diff(_raw(merged), refs["b"]) <= TOL


def test_module_paths_map_by_one_prefix_rewrite():
    graph = ["m.model.layers.0.q", "m.model.layers.1.q", "m.lm_head"]
    assert map_modules(["model.layers.0.q", "model.layers.1.q", "lm_head"], graph) == {
        "model.layers.0.q": "m.model.layers.0.q", "model.layers.1.q": "m.model.layers.1.q", "lm_head": "m.lm_head"}
    # a wrapper of the inner model; layer 5 is not layer 0 of a one-layer graph
    assert map_modules(["model.layers.0.q", "model.layers.5.q"], ["m.layers.0.q"]) == {
        "model.layers.0.q": "m.layers.0.q", "model.layers.5.q": None}
    assert map_modules(["model.layers.0.q"], ["layers.0.q", "layers.1.q"]) == {"model.layers.0.q": "layers.0.q"}
    assert map_modules(["q"], ["a.q", "b.q"]) == {"q": None}  # ambiguous: nothing is guessed


# -- 3. merge into a slot model ----------------------------------------------------------------


def test_merge_folds_an_adapter_into_a_slot_model_and_drops_its_slots(llama, external, tmp_path):
    dirs, refs = llama
    slots = onnx_peft.export(dirs["base"], tmp_path / "inputs", adapters={"a": dirs["a"]}, task="causal-lm",
                             mode="inputs", quiet=True)
    merged = merge_adapters(slots, tmp_path / "m1", adapter_dir=dirs["b"])
    assert _diff(_raw(merged), refs["b"]) <= TOL
    model = load_model(merged)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]  # no slots left
    assert not any(n.metadata_props.get(BRANCH_KEY) for n in model.graph)  # nor their branches
    assert not any("lora" in name for name in model.graph.initializers) and CONTRACT_KEY not in model.metadata_props
    with pytest.raises(IncompatibleAdapterError, match="--adapter ADAPTER_DIR"):
        merge_adapters(slots, tmp_path / "m2")
    assert _diff(_raw(merge_adapters(external, tmp_path / "m3")), refs["a"]) <= TOL  # the adapter it holds
    assert _diff(_raw(merge_adapters(external, tmp_path / "m4", adapter_dir=dirs["b"])), refs["b"]) <= TOL


# -- 4. LoRA on grouped convolutions ------------------------------------------------------------


class _Grouped(nn.Module):
    """x [b, 4, 6, 6] -> [b, 3]: a grouped conv (groups=2) and a depthwise one (groups=8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(torch.relu(self.conv(x))).mean((2, 3)))


def _grouped() -> nn.Module:
    torch.manual_seed(0)
    return _Grouped().eval()


def test_lora_on_grouped_convolutions_matches_peft_and_round_trips(tmp_path):
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    kwargs = dict(r=8, lora_alpha=16, target_modules=["conv", "dw", "fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that grouped convs cannot merge
        theirs, ours = peft_and_ours(_grouped, peft.LoraConfig(**kwargs), onnx_peft.LoraConfig(**kwargs))
        assert max_diff(run(ours, x), run(theirs, x)) <= TOL and max_diff(run(ours, x), run(_grouped(), x)) > 1e-2
        assert ours.base_model.model.dw.lora_B["default"].weight.shape == (8, 1, 1, 1)  # [out, r / groups]
        theirs.save_pretrained(tmp_path / "theirs")
        ours.save_pretrained(tmp_path / "ours")
        loaded = onnx_peft.PeftModel.from_pretrained(_grouped(), tmp_path / "theirs")
        assert max_diff(run(loaded, x), run(theirs, x)) <= TOL
        back = peft.PeftModel.from_pretrained(_grouped(), tmp_path / "ours").eval()
        assert max_diff(run(back, x), run(ours, x)) <= TOL
    with pytest.raises(AdapterConfigError, match="cannot be merged"):
        ours.merge_and_unload()
    with pytest.raises(AdapterConfigError, match="multiple of 8"):
        onnx_peft.get_peft_model(_grouped(), onnx_peft.LoraConfig(r=4, target_modules=["dw"]))
    with pytest.raises(AdapterConfigError, match="DoRA"):
        onnx_peft.get_peft_model(_grouped(), onnx_peft.LoraConfig(r=8, target_modules=["dw"], use_dora=True))
    path = tmp_path / "grouped.onnx"  # in-graph: the grouped B is an ONNX Conv with group=8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours.base_model.model, (x,), str(path), dynamo=False, input_names=["x"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert _diff(got, run(theirs, x).numpy()) <= TOL


# -- 5. insert: non-LoRA adapters with a head trained in full ------------------------------------


def test_insert_serves_a_non_lora_adapter_with_a_trained_head(tmp_path):
    tiny_bert_cls().save_pretrained(tmp_path / "bert")
    model = peft.get_peft_model(tiny_bert_cls(), peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "value",
                                                                                                    "output.dense"],
                                                                feedforward_modules=["output.dense"]))
    perturb_trainable(model, 4)
    model.save_pretrained(tmp_path / "ia3")
    refs = {"base": _reference(None, tiny_bert_cls), "ia3": _reference(tmp_path / "ia3", tiny_bert_cls)}
    base = onnx_peft.export(tmp_path / "bert", tmp_path / "onnx", task="sequence-classification", quiet=True)
    for out in (insert_adapters(base, {"ia3": tmp_path / "ia3"}, tmp_path / "ins"),
                onnx_peft.export(tmp_path / "bert", tmp_path / "exp", adapters={"ia3": tmp_path / "ia3"},
                                 task="sequence-classification", mode="inputs", quiet=True)):
        session = AdapterSession(out)
        assert {s.name for s in session.contract.slots if s.method == FULL_WEIGHT_METHOD} == {
            "classifier.weight", "classifier.bias"}
        session.load_adapter("file", out.parent / "adapters" / "ia3.onnx_adapter")
        session.load_adapter("dir", tmp_path / "ia3")
        feeds = _feeds(session.input_names)
        for name, ref in (("file", "ia3"), ("dir", "ia3"), (None, "base")):
            assert _diff(session.run(["logits"], feeds, adapter=name)[0], refs[ref]) <= TOL, (out, name)
    baked = insert_adapters(base, {"ia3": tmp_path / "ia3"}, tmp_path / "baked", mode="in-graph")
    assert _diff(_raw(baked), refs["ia3"]) <= TOL


def test_a_peftmodel_of_another_method_exports_with_swappable_slots(tmp_path):
    """export(PeftModel(IA3), mode="inputs") goes base + insert (ExtractAdapters reads LoRA only)."""
    import numpy as np
    import torch
    from tiny_models import TOL, perturb_trainable, tiny_llama

    import onnx_peft

    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                                        feedforward_modules=["down_proj"]))
    perturb_trainable(model, around=1.0)
    model.eval()
    path = onnx_peft.export(model, tmp_path / "ia3", task="causal-lm", mode="inputs", quiet=True)
    session = onnx_peft.AdapterSession(path)
    session.load_adapter("default", path.parent / "adapters" / "default.onnx_adapter")
    ids = np.array([[5, 6, 7, 8]])
    logits, = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}, adapter="default")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
        base = tiny_llama()(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(logits - expected).max() <= TOL
    assert np.abs(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0] - base).max() <= TOL
    assert any(isinstance(m, onnx_peft.tuners.ia3.IA3Layer) for m in model.modules())  # the model is untouched


def test_wrong_adapters_are_diagnosed_in_model_terms(tmp_path):
    """A LoRA trained on wider layers is refused before the export, naming module and sizes; an
    fp32 adapter file on an fp16 model is a dtype problem, not "another base model"."""
    import time

    import peft
    import pytest
    from tiny_models import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    import onnx_peft
    from onnx_peft.errors import IncompatibleAdapterError

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    peft.get_peft_model(wide, peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    tiny_llama().save_pretrained(tmp_path / "base")
    started = time.perf_counter()
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj was trained as 48 -> 48 features, the model's is 32"):
        onnx_peft.export(tmp_path / "base", tmp_path / "out", adapters={"w": tmp_path / "wide"}, task="causal-lm",
                         mode="inputs", quiet=True)
    assert time.perf_counter() - started < 10  # before any tracing
    lora = tmp_path / "lora"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
    fp16 = onnx_peft.export(tmp_path / "base", tmp_path / "fp16", adapters={"a": lora}, task="causal-lm",
                            mode="inputs", dtype="fp16", quiet=True)
    fp32_file = tmp_path / "a32.onnx_adapter"
    onnx_peft.convert_adapters(lora, output_path=fp32_file, dtype="fp32")
    with pytest.raises(IncompatibleAdapterError, match="holds float32 tensors and the model takes float16"):
        onnx_peft.AdapterSession(fp16).load_adapter("a", fp32_file)
    fp32 = onnx_peft.export(tmp_path / "base", tmp_path / "fp32", adapters={"a": lora}, task="causal-lm",
                            mode="inputs", quiet=True)
    # one base, two dtypes: one fingerprint, so a converted adapter's base check means what it says
    assert onnx_peft.AdapterSession(fp16).contract.fingerprint == onnx_peft.AdapterSession(fp32).contract.fingerprint

