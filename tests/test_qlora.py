"""QLoRA: LoRA on 4-bit bases (bitsandbytes' Linear4bit from transformers, or our own quantize_model)
trains, saves and loads as in HF PEFT, merges by dequantize/merge/requantize, and LoftQ initialises
it on CPU with a smaller quantization error than plain NF4."""

from __future__ import annotations

import copy

import pytest
import torch
from test_loftq import llama64, llama64_dir  # noqa: F401  (fixture)
from tiny_models import max_diff, perturb_trainable

from onnx_peft import (
    LoftQConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
    quantize_model,
)
from onnx_peft.quant.layers import dequantized_weight

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]
IDS = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                 torch_dtype=torch.float32)
    for module in model.modules():  # bitsandbytes' AVX512-BF16 repacking rounds absmax (see quant/layers)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_on_a_bitsandbytes_4bit_model_equals_peft_both_ways(llama64_dir, tmp_path):  # noqa: F811
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    theirs = peft.get_peft_model(load_4bit(llama64_dir), peft.LoraConfig(**config)).eval()
    perturb_trainable(theirs, seed=1, scale=0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(load_4bit(llama64_dir), tmp_path / "peft").eval()
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load_4bit(llama64_dir), tmp_path / "ours").eval()
    assert max_diff(logits(back), logits(theirs)) <= 1e-5


def test_qlora_trains_on_our_4bit_layers_and_only_the_adapter_moves():
    model = prepare_model_for_kbit_training(quantize_model(llama64(), "nf4", blocksize=64, double_quant=True),
                                            use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_merge_on_a_4bit_base_requantizes_and_unmerge_restores_the_codes():
    model = get_peft_model(quantize_model(llama64(), "nf4", blocksize=64), LoraConfig(r=4, target_modules=TARGETS))
    perturb_trainable(model, seed=2, scale=0.05)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = dequantized_weight(layer.base_layer).clone()
    delta = layer.get_delta_weight("default").detach()
    model.merge_adapter()
    after = dequantized_weight(layer.base_layer)
    # merging = the NF4 requantization of W + dW, exactly as formats.py (= bitsandbytes) quantizes it
    assert torch.equal(after, nf4_round_trip(before + delta))
    assert max_diff(after, before + delta) > 0  # ... which is lossy, as in PEFT
    model.unmerge_adapter()
    assert torch.equal(dequantized_weight(layer.base_layer), nf4_round_trip(after - delta))


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    from onnx_peft.quant.formats import dequantize_4bit, quantize_4bit

    return torch.from_numpy(dequantize_4bit(quantize_4bit(weight.numpy(), "nf4", blocksize=64)))


def test_loftq_init_on_cpu_reduces_the_quantization_error_of_plain_nf4():
    base = llama64()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights="loftq",
                                                           loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=4)))
    assert model.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 4}
    plain = quantize_model(copy.deepcopy(base), "nf4", blocksize=64)
    loftq_error = plain_error = 0.0
    for name, w in weights.items():
        layer = model.base_model.model.get_submodule(name)
        approx = layer.base_layer.weight + layer.get_delta_weight("default")
        loftq_error += (w - approx).norm().item()
        plain_error += (w - dequantized_weight(plain.get_submodule(name))).norm().item()
    assert loftq_error < 0.95 * plain_error


@pytest.mark.parametrize("mode", ["inputs", "merged"])
def test_a_4bit_peft_model_exports_with_its_own_codes_and_matches_torch(mode, tmp_path):
    import numpy as np

    from onnx_peft import AdapterSession, export
    from onnx_peft.graph.io import load_model
    from onnx_peft.graph.modules import find_linear_sites
    from onnx_peft.passes.quantize_base import read_quantized

    model = get_peft_model(quantize_model(llama64(), "nf4", blocksize=64, double_quant=True),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    perturb_trainable(model, seed=3, scale=0.1)
    expected = logits(model).numpy()
    with model.disable_adapter():
        base = logits(model).numpy()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    codes = q_proj.quant_state()
    out = export(copy.deepcopy(model) if mode == "merged" else model, tmp_path / mode, task="causal-lm",
                 mode=mode, quiet=True)
    onnx_model = load_model(out)
    assert sum(n.op_type == "MatMulBnb4" for n in onnx_model.graph) == 7  # every Linear of the layer; lm_head float
    q_node = find_linear_sites(onnx_model)["model.layers.0.self_attn.q_proj"].node
    state = read_quantized(q_node).state()
    if mode == "inputs":  # the codes training used, not a second quantization
        np.testing.assert_array_equal(state.packed, codes.packed)
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    session = AdapterSession(out)
    if mode == "inputs":
        session.load_adapter("a", out.parent / "adapters" / "default.onnx_adapter")
        assert np.abs(session.run(["logits"], feeds, adapter="a")[0] - expected).max() <= 1e-4
        assert np.abs(session.run(["logits"], feeds)[0] - base).max() <= 1e-4
    else:  # merged into the 4-bit base (requantized in torch): ORT runs exactly that merged model
        merged = logits(copy.deepcopy(model).merge_and_unload()).numpy()
        assert np.abs(session.run(["logits"], feeds)[0] - merged).max() <= 1e-4


def test_a_4bit_checkpoint_folder_exports_without_requantizing(llama64_dir, tmp_path):  # noqa: F811
    import numpy as np

    from onnx_peft import AdapterSession, export
    from onnx_peft.graph.io import load_model
    from onnx_peft.graph.modules import find_linear_sites
    from onnx_peft.passes.quantize_base import read_quantized
    from onnx_peft.quant.layers import quant_state

    model = load_4bit(llama64_dir)
    model.save_pretrained(tmp_path / "nf4")  # transformers' 4-bit checkpoint: packed codes + quant states
    codes = quant_state(model.model.layers[0].mlp.down_proj)
    reference = quantize_model(llama64(), "nf4", blocksize=64, double_quant=True).eval()
    out = export(tmp_path / "nf4", tmp_path / "onnx", task="causal-lm", quiet=True)
    node = find_linear_sites(load_model(out))["model.layers.0.mlp.down_proj"].node
    np.testing.assert_array_equal(read_quantized(node).state().packed, codes.packed)
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    assert np.abs(AdapterSession(out).run(["logits"], feeds)[0] - logits(reference).numpy()).max() <= 1e-4


def test_ort_equals_peft_qlora_on_the_bitsandbytes_base_with_and_without_adapter(llama64_dir, tmp_path):  # noqa: F811
    import numpy as np

    from onnx_peft import AdapterSession, export

    load_4bit(llama64_dir).save_pretrained(tmp_path / "nf4")
    theirs = peft.get_peft_model(load_4bit(tmp_path / "nf4"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules="all-linear")).eval()
    perturb_trainable(theirs, seed=4, scale=0.2)
    theirs.save_pretrained(tmp_path / "adapter")
    expected = logits(theirs).numpy()
    with theirs.disable_adapter():
        base = logits(theirs).numpy()
    out = export(tmp_path / "nf4", tmp_path / "onnx", adapters={"a": tmp_path / "adapter"}, task="causal-lm",
                 mode="inputs", quiet=True)
    session = AdapterSession(out)
    session.load_adapter("a", out.parent / "adapters" / "a.onnx_adapter")
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    assert np.abs(session.run(["logits"], feeds, adapter="a")[0] - expected).max() <= 1e-4
    assert np.abs(session.run(["logits"], feeds)[0] - base).max() <= 1e-4


def test_per_row_adapters_on_a_4bit_base(tmp_path):
    import numpy as np

    from onnx_peft import AdapterSession, export
    from onnx_peft.passes.multi_adapter import multi_adapter

    model = get_peft_model(quantize_model(llama64(), "nf4", blocksize=64),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    perturb_trainable(model, seed=5, scale=0.1)
    ids = torch.cat([IDS, IDS[:1]])
    expected = logits(model, ids).numpy()
    with model.disable_adapter():
        base = logits(model, ids).numpy()
    out = export(model, tmp_path / "slots", task="causal-lm", mode="inputs", quiet=True)
    session = AdapterSession(multi_adapter(out, tmp_path / "multi"))
    session.load_adapter("a", out.parent / "adapters" / "default.onnx_adapter")
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    mixed = session.run(["logits"], feeds, adapter=["a", None, "a"])[0]
    assert np.abs(mixed[[0, 2]] - expected[[0, 2]]).max() <= 1e-4
    assert np.abs(mixed[1] - base[1]).max() <= 1e-4
