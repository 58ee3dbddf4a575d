"""onnx_peft.quant.loftq: LoftQ on CPU, the same numbers as PEFT's (which needs CUDA).

PEFT's functions are run on CPU by compiling their own source with the device string changed,
so the comparison is with PEFT's code, not a re-reading of it. Models compared through
bitsandbytes use in_features that are multiples of 64: bitsandbytes 0.50's AVX-512 CPU kernel
dequantizes wrongly when a block straddles two rows.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_models import VOCAB, max_diff
from torch import nn

from onnx_peft.errors import OnnxPeftError
from onnx_peft.quant.formats import QuantizationError
from onnx_peft.quant.layers import Linear4bit, dequantized_weight, quantize_model
from onnx_peft.quant.loftq import (
    LoftQConfig,
    apply_loftq,
    dequantize_state,
    loftq_init,
    low_rank_decomposition,
    replace_lora_weights_loftq,
)

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")


def peft_on_cpu(function_name: str):
    """PEFT's own ``loftq_utils.<function_name>`` with its CUDA/XPU device replaced by the CPU."""
    source = inspect.getsource(getattr(loftq_utils, function_name))
    patched = source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"')
    if patched == source:
        pytest.skip(f"peft.utils.loftq_utils.{function_name} no longer picks its device the way this test patches")
    namespace = dict(vars(loftq_utils))
    exec(compile(patched, loftq_utils.__file__, "exec"), namespace)
    return namespace[function_name]


def weight(out_features: int = 128, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum, like trained ones (a white-noise weight has none)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out_features, 16, generator=g) @ torch.randn(16, in_features, generator=g)
    return 0.02 * torch.randn(out_features, in_features, generator=g) + 0.01 * low


def llama64():
    """A one-layer Llama whose linears all have in_features % 64 == 0 (hidden 64, intermediate 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("num_bits,num_iter", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_init_is_peft_loftq_init(num_bits, num_iter):
    w = weight()
    q, lora_A, lora_B = peft_on_cpu("loftq_init")(w, num_bits=num_bits, reduced_rank=8, num_iter=num_iter)
    ours = loftq_init(w, num_bits, reduced_rank=8, num_iter=num_iter)
    assert ours.lora_A.shape == (8, 256) and ours.lora_B.shape == (128, 8)
    assert max_diff(dequantize_state(ours.state), q) <= 1e-6, (
        "the quantized base differs from PEFT's; for 8 bits formats.quantize_int8 must round as torch "
        "does (127.0/SCB is computed as (1/SCB)*127)")
    assert max_diff(ours.lora_A, lora_A) <= 1e-6 and max_diff(ours.lora_B, lora_B) <= 1e-6


def test_low_rank_decomposition_is_peft_split():
    w = weight()
    L, R = low_rank_decomposition(w, 8)
    theirs = loftq_utils._low_rank_decomposition(w, reduced_rank=8)
    assert max_diff(L, theirs["L"]) <= 1e-6 and max_diff(R, theirs["R"]) <= 1e-6


def test_loftq_removes_quantization_error():
    w = weight()
    plain = (w - dequantize_state(loftq_init(w, 4, 8, 1).state)).norm().item()  # LoftQ's Q at iter 1 = NF4(W)
    errors = {}
    for num_iter in (1, 2, 5):
        result = loftq_init(w, 4, reduced_rank=8, num_iter=num_iter)
        approx = dequantize_state(result.state) + result.lora_B @ result.lora_A
        errors[num_iter] = (w - approx).norm().item()
    print(f"\n||W - Q||: plain NF4 {plain:.4f}; LoftQ r=8 iter 1/2/5: "
          + " / ".join(f"{errors[i]:.4f}" for i in (1, 2, 5)))
    assert errors[1] < plain
    assert errors[5] <= errors[2] <= errors[1]


def test_apply_loftq_accounts_for_lora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(256, 128)
    base.weight.data = weight()
    lora_A, lora_B = nn.Linear(256, 8, bias=False), nn.Linear(8, 128, bias=False)
    for scaling in (1.0, 2.0):
        new_base = apply_loftq(base, lora_A, lora_B, scaling, LoftQConfig(loftq_bits=4, loftq_iter=2))
        merged = new_base + scaling * lora_B.weight @ lora_A.weight
        reference = loftq_init(base.weight, 4, 8, 2)
        expected = dequantize_state(reference.state) + reference.lora_B @ reference.lora_A
        assert max_diff(merged, expected) <= 1e-6  # s * B @ A is the rank-r correction for any s
    q, peft_A, peft_B = peft_on_cpu("loftq_init")(base.weight, num_bits=4, reduced_rank=8, num_iter=2)
    apply_loftq(base, lora_A, lora_B, 1.0, {"loftq_bits": 4, "loftq_iter": 2})  # the dict LoraConfig stores
    assert max_diff(lora_A.weight, peft_A) <= 1e-6 and max_diff(lora_B.weight, peft_B) <= 1e-6

    transposed = apply_loftq(_Conv1DLike(base.weight.T), lora_A, lora_B, 1.0, LoftQConfig(4, 2),
                             fan_in_fan_out=True)
    assert max_diff(transposed.T, q) <= 1e-6


class _Conv1DLike(nn.Module):
    def __init__(self, weight_in_out: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight_in_out.detach().clone())


def test_loftq_bad_input():
    with pytest.raises(QuantizationError, match="loftq_bits 4"):
        loftq_init(weight(), num_bits=2)
    with pytest.raises(QuantizationError, match="r=999"):
        loftq_init(weight(), reduced_rank=999)
    with pytest.raises(OnnxPeftError, match="replace_lora_weights_loftq"):
        apply_loftq(Linear4bit.from_linear(nn.Linear(64, 64)), nn.Linear(64, 4), nn.Linear(4, 64), 1.0)


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama64")
    llama64().save_pretrained(path)
    return path


def peft_qlora(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    lora = peft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear")
    return peft.get_peft_model(model, lora).eval()


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_replace_lora_weights_loftq_is_peft_on_a_bitsandbytes_model(llama64_dir, monkeypatch):
    theirs, ours = peft_qlora(llama64_dir), peft_qlora(llama64_dir)
    monkeypatch.setattr(loftq_utils, "_loftq_init_new", peft_on_cpu("_loftq_init_new"))
    loftq_utils.replace_lora_weights_loftq(theirs, model_path=str(llama64_dir))
    replace_lora_weights_loftq(ours, model_path=llama64_dir)
    expected, got = lora_tensors(theirs), lora_tensors(ours)
    assert len(got) == 14 and got.keys() == expected.keys()
    assert {k: max_diff(got[k], expected[k]) for k in got} == {k: 0.0 for k in got}
    float_weights = dict(llama64().named_parameters())
    plain = loftq = 0.0
    for name, module in ours.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            w = float_weights[name.removeprefix("base_model.model.") + ".weight"].detach()
            residual = w - dequantized_weight(module.base_layer)
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            plain, loftq = plain + residual.norm().item() ** 2, loftq + (residual - delta).norm().item() ** 2
    print(f"\nsum ||W - Q||^2 over 7 layers: plain NF4 {plain:.4f}, with LoftQ r=4 {loftq:.4f}")
    assert loftq < plain


def test_replace_lora_weights_loftq_callback_can_roll_back(llama64_dir):
    model = peft_qlora(llama64_dir)
    before = lora_tensors(model)
    seen = []

    def keep_only_q_proj(_model, name):
        seen.append(name)
        return name.endswith("q_proj")

    replace_lora_weights_loftq(model, model_path=llama64_dir / "model.safetensors", callback=keep_only_q_proj)
    after = lora_tensors(model)
    assert len(seen) == 7 and "model.layers.0.self_attn.q_proj" in seen
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".q_proj." in k for k in changed)


class _StandInLoraLinear(nn.Module):
    """The attributes replace_lora_weights_loftq relies on, as onnx_peft's and PEFT's LoRA layers have them."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling = {"default": r}, {"default": alpha / r}
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base_layer.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base_layer.out_features, bias=False)})


def test_replace_lora_weights_loftq_on_our_own_4bit_layers(llama64_dir):
    model = quantize_model(llama64(), "nf4", 64, double_quant=True)
    float_weights = dict(llama64().named_parameters())
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _StandInLoraLinear(module, r=4, alpha=8))
            wrapped.append(name)
    holder = nn.Module()
    holder.base_model = nn.Module()
    holder.base_model.model = model
    replace_lora_weights_loftq(holder, model_path=llama64_dir)
    for name in wrapped:
        layer = model.get_submodule(name)
        w = float_weights[name + ".weight"].detach()
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        residual = w - dequantized_weight(layer.base_layer)
        assert (residual - delta).norm() < residual.norm()
        best = low_rank_decomposition(residual, 4)
        assert max_diff(delta, best[0] @ best[1]) <= 1e-6


def test_replace_lora_weights_loftq_on_onnx_peft_model(llama64_dir):
    from onnx_peft import LoraConfig, get_peft_model

    model = get_peft_model(quantize_model(llama64(), "nf4"), LoraConfig(r=4, lora_alpha=4,
                                                                         target_modules=["q_proj", "v_proj"]))
    before = lora_tensors(model)
    replace_lora_weights_loftq(model, model_path=llama64_dir)
    after = lora_tensors(model)
    assert len(after) == 4 and all(not torch.equal(after[k], before[k]) for k in after)


def test_replace_lora_weights_loftq_errors(tmp_path, llama64_dir):
    with pytest.raises(OnnxPeftError, match="model.safetensors"):
        replace_lora_weights_loftq(nn.Module(), model_path=tmp_path)
    holder = nn.Module()
    with pytest.raises(OnnxPeftError, match="no LoRA layer"):
        replace_lora_weights_loftq(holder, model_path=llama64_dir)
    with pytest.raises(OnnxPeftError, match="model_path="):
        replace_lora_weights_loftq(holder)
