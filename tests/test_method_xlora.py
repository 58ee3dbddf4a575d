"""X-LoRA against HF PEFT on numbers: the two-pass forward and greedy generate, checkpoints both
ways, training, errors, and the ONNX export of both passes in one graph (fp32, <= 1e-5).

The experts are two PEFT LoRA folders on tiny_llama with different targets (q/v_proj and
q_proj/down_proj), so some layers hold one expert and some two.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import (
    TOL,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    snapshot,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.errors import AdapterConfigError, CheckpointError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.xlora import XLoraConfig
from onnx_peft.tuners.xlora import XLoraLinear

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

CLASSIFIER = "internal_xlora_classifier"
VARIANTS = {
    "depth2": dict(xlora_depth=2, xlora_size=16),
    "layerwise-top1-softmax-topk": dict(layerwise_scalings=True, top_k_lora=1, enable_softmax_topk=True,
                                        softmax_temperature=0.5, global_scaling_weight=0.7),
    "no-softmax-scaling-pass": dict(enable_softmax=False, scaling_pass_value=0.5),
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """{"0": dir, "1": dir}: two PEFT LoRA experts with seeded non-zero weights."""
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for i, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "down_proj"]]):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        perturb_trainable(model, seed=i)
        model.save_pretrained(root / str(i))
        out[str(i)] = str(root / str(i))
    return out


def _kwargs(experts, **overrides):
    return dict(task_type="CAUSAL_LM", hidden_size=32, adapters=dict(experts), xlora_dropout_p=0.0, **overrides)


def _peft_base():
    model = tiny_llama()
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    return model


def _pair(experts, seed=0, **overrides):
    """(PEFT's, ours): the same experts and the same (perturbed) classifier."""
    theirs = peft.get_peft_model(_peft_base(), peft.XLoraConfig(**_kwargs(experts, **overrides))).eval()
    perturb_trainable(theirs, seed, select=(CLASSIFIER,))
    ours = onnx_peft.get_peft_model(tiny_llama(), XLoraConfig(**_kwargs(experts, **overrides))).eval()
    state = {k.replace(f"{CLASSIFIER}.", f"{CLASSIFIER}.default."): v for k, v in theirs.state_dict().items()
             if CLASSIFIER in k}
    assert not ours.load_state_dict(state, strict=False).unexpected_keys
    return theirs, ours


def _classifier(model):
    return getattr(model.base_model, CLASSIFIER)["default"]


# -- forward and generate ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_and_scalings_equal_peft(experts, variant):
    theirs, ours = _pair(experts, **VARIANTS[variant])
    x = token_ids()

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert max_diff(_classifier(ours).latest, theirs.get_latest_scalings()) <= TOL
    assert max_diff(run(ours, x), run(tiny_llama(), x)) > 1e-2  # the experts really act


def test_layers_are_numbered_in_model_order_with_their_experts(experts):
    _, ours = _pair(experts)
    layers = {n: m for n, m in ours.base_model.model.named_modules() if isinstance(m, XLoraLinear)}

    assert _classifier(ours).n_layers == len(layers) == 6
    assert layers["model.layers.0.self_attn.q_proj"].experts() == ["0", "1"]
    assert layers["model.layers.0.mlp.down_proj"].experts() == ["1"]


def test_greedy_generate_equals_peft_with_and_without_cache(experts):
    theirs, ours = _pair(experts, seed=1)
    x = token_ids()
    with torch.no_grad():
        want = theirs.generate(input_ids=x, max_new_tokens=6, do_sample=False)
        cached = ours.generate(input_ids=x, max_new_tokens=6, do_sample=False)
        uncached = ours.generate(input_ids=x, max_new_tokens=6, do_sample=False, use_cache=False)

    assert torch.equal(cached, want) and torch.equal(uncached, want)


def test_cache_holds_both_passes_and_decoding_with_it_equals_the_full_forward(experts):
    _, ours = _pair(experts, seed=2)
    x = token_ids(seq=8)
    with torch.no_grad():
        full = ours(input_ids=x).logits
        prefill = ours(input_ids=x[:, :5], use_cache=True)
        step = ours(input_ids=x[:, 5:], cache=prefill.past_key_values, use_cache=True)

    kv_heads = ours.config.num_key_value_heads
    assert prefill.past_key_values.layers[0].keys.shape[1] == 2 * kv_heads
    assert max_diff(step.logits, full[:, 5:]) <= TOL


def test_disable_adapter_and_unload_give_the_base_model(experts):
    _, ours = _pair(experts)
    x = token_ids()
    base = run(tiny_llama(), x)
    with ours.disable_adapter():
        assert max_diff(run(ours, x), base) == 0.0

    plain = ours.unload()

    assert max_diff(run(plain, x), base) == 0.0
    assert not plain._forward_pre_hooks and not plain._forward_hooks  # the two-pass hooks went too


# -- checkpoints -------------------------------------------------------------------------------
def test_saved_here_loads_in_peft_and_here_with_same_logits(experts, tmp_path):
    _, ours = _pair(experts, seed=3, xlora_depth=2, xlora_size=16)
    x = token_ids()
    ours.save_pretrained(tmp_path)

    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "XLORA"
    assert saved_keys(tmp_path) == {f"base_model.{CLASSIFIER}.layers.{i}.{p}": s for i, (w, b) in
                                    ((0, ((16, 32), (16,))), (2, ((2, 16), (2,)))) for p, s in (("weight", w), ("bias", b))}
    assert saved_keys(tmp_path / "1") == saved_keys(experts["1"])  # the experts, as PEFT LoRA folders
    in_peft = peft.PeftModel.from_pretrained(_peft_base(), tmp_path, adapters={k: str(tmp_path / k) for k in "01"})
    here = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the saved experts, as PEFT documents
    assert max_diff(run(in_peft, x), run(ours, x)) <= TOL
    assert max_diff(run(here, x), run(ours, x)) <= TOL


def test_peft_checkpoint_loads_here_with_same_logits(experts, tmp_path):
    from safetensors.torch import save_file

    theirs, _ = _pair(experts, seed=4)
    x = token_ids()
    theirs.peft_config["default"].save_pretrained(str(tmp_path))
    # the classifier under the keys PEFT's X-LoRA tuner gives (_get_adapter_state_dict)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items() if CLASSIFIER in k},
              str(tmp_path / "adapter_model.safetensors"))

    here = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, adapters=experts)

    assert max_diff(run(here, x), run(theirs, x)) <= TOL


def test_peft_save_pretrained_output_is_refused_naming_what_it_lost(experts, tmp_path):
    # PEFT 0.21 drops every key holding an expert's name (".0.") from the X-LoRA file, so the
    # classifier's first layer is not saved, and writes whole-model copies as expert folders.
    theirs, _ = _pair(experts)
    theirs.save_pretrained(tmp_path)

    with pytest.raises(CheckpointError, match=r"copy of a whole X-LoRA model.*adapters="):
        onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(CheckpointError, match=rf"lacks tensor 'base_model\.{CLASSIFIER}\.layers\.0\.weight'"):
        onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, adapters=experts)


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable_experts", [False, True])
def test_training_lowers_the_loss_and_changes_only_the_classifier_and_trainable_experts(experts,
                                                                                        trainable_experts):
    model = onnx_peft.get_peft_model(tiny_llama(), XLoraConfig(**_kwargs(
        experts, xlora_depth=2, xlora_size=16, use_trainable_adapters=trainable_experts))).train()
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    losses = train_steps(model, token_ids(), optimizer, steps=4)

    assert losses[-1] < losses[0]
    changed = changed_since(model, before)
    assert {k for k in changed if CLASSIFIER in k} == {k for k in before if CLASSIFIER in k}
    experts_changed = {k for k in changed if ".lora_" in k}
    assert experts_changed == ({k for k in before if ".lora_" in k} if trainable_experts else set())
    assert changed <= {k for k in before if CLASSIFIER in k or ".lora_" in k}


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("hidden_size", None), ("hidden_size", 0), ("adapters", {}), ("xlora_depth", 0), ("xlora_size", -1),
    ("xlora_dropout_p", 1.0), ("softmax_temperature", 0.0), ("top_k_lora", 0), ("top_k_lora", 3),
    ("enable_softmax_topk", True),
])
def test_bad_config_field_raises_naming_it(experts, field, value):
    with pytest.raises(AdapterConfigError, match=f"XLoraConfig.{field}"):
        XLoraConfig(**{**_kwargs(experts), field: value})


def test_wrong_hidden_size_and_dora_expert_are_refused(experts, tmp_path):
    with pytest.raises(AdapterConfigError, match="hidden_size=64 but LlamaForCausalLM has hidden_size 32"):
        onnx_peft.get_peft_model(tiny_llama(), XLoraConfig(**{**_kwargs(experts), "hidden_size": 64}))
    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path)
    with pytest.raises(AdapterConfigError, match="expert 'd'.*use_dora=True"):
        onnx_peft.get_peft_model(tiny_llama(), XLoraConfig(**_kwargs({"d": str(tmp_path)})))


def test_no_merged_form_and_no_slots(experts):
    _, ours = _pair(experts)
    method = method_for("XLORA")
    config = ours.peft_config["default"]

    for call in (lambda: ours.merge_and_unload(), lambda: method.group({}),
                 lambda: method.merged_weight(config, "q", np.eye(2), None, {}, {}),
                 lambda: method.slot_tensors(config, "q", {}, {}, lambda: np.eye(2))):
        with pytest.raises(AdapterConfigError, match="routes its LoRA experts per token"):
            call()


# -- ONNX --------------------------------------------------------------------------------------
def test_export_with_past_equals_torch_and_decodes_like_peft(experts, tmp_path):
    """One graph holds both passes and both caches (Optimum's layout, twice the KV heads): its
    prefill logits equal the torch forward and AdapterSession.generate PEFT's generate."""
    import onnxruntime as ort

    theirs, ours = _pair(experts, seed=5)
    x = token_ids()
    path = onnx_peft.export(ours, tmp_path / "onnx", task="causal-lm-with-past", mode="in-graph", quiet=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy()),
             "position_ids": np.broadcast_to(np.arange(x.shape[1]), x.shape).copy()}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((x.shape[0], value.shape[1], 0, value.shape[3]), np.float32)

    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = theirs.generate(input_ids=x, max_new_tokens=6, do_sample=False)

    assert np.abs(logits - run(ours, x).numpy()).max() <= TOL
    assert np.array_equal(onnx_peft.AdapterSession(path).generate(x.numpy(), max_new_tokens=6), want.numpy())


@pytest.mark.parametrize("mode", ["merged", "inputs", "external"])
def test_export_modes_without_a_static_form_are_refused(experts, tmp_path, mode):
    _, ours = _pair(experts)
    with pytest.raises(AdapterConfigError, match="no merged weight"):
        onnx_peft.export(ours, tmp_path / "onnx", task="causal-lm", mode=mode, quiet=True)
    assert not (tmp_path / "onnx").exists()
