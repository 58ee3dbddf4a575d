"""onnx_peft.quant.layers: our 4/8-bit linears store and compute exactly what bitsandbytes does.

bitsandbytes 0.50's AVX-512 CPU kernels dequantize wrongly when a row (in_features) is not a
multiple of the block size (blocks that straddle rows); comparisons with its kernels therefore use
in_features % blocksize == 0, and other shapes are compared with its pure-PyTorch reference op.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import max_diff, run, tiny_llama, token_ids
from torch import nn

from onnx_peft.quant import formats
from onnx_peft.quant.formats import QuantizationError
from onnx_peft.quant.layers import (
    Linear4bit,
    Linear8bit,
    dequantized_weight,
    is_quantized_linear,
    linear_features,
    prepare_model_for_kbit_training,
    quant_state,
    quantize_model,
    requantize_into,
)

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def seeded_linear(in_features: int = 128, out_features: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def bnb_linear4bit(linear: nn.Linear, quant_type: str, double_quant: bool) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes here
    layer.support_avx512bf16_for_cpu = False  # keep its eval path on the plain (lossless) layout
    return layer


def bnb_linear8bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def reference_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own pure-PyTorch dequantize (what its CUDA and scalar CPU kernels compute)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax.float(), state.code,
                                    state.blocksize, state.shape, torch.float32)


@pytest.mark.parametrize("quant_type,double_quant", FOUR_BIT)
def test_linear4bit_stores_and_computes_what_bitsandbytes_does(quant_type, double_quant):
    linear = seeded_linear()
    ours = Linear4bit.from_linear(linear, quant_type, 64, double_quant)
    theirs = bnb_linear4bit(linear, quant_type, double_quant)
    state = theirs.weight.quant_state

    assert torch.equal(ours.weight, theirs.weight.data)  # same codes, same [out*in/2, 1] layout
    if double_quant:
        assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.nested_absmax, state.state2.absmax)
        assert float(ours.nested_offset) == float(state.offset)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    expected = BF.dequantize_4bit(theirs.weight.data, state)
    assert torch.equal(ours.dequantize(), expected)
    assert torch.equal(dequantized_weight(theirs), expected)  # the seam reads bitsandbytes layers too

    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= 1e-6
    x.requires_grad_(True)
    assert max_diff(ours(x), theirs(x)) <= 1e-6  # bitsandbytes' autograd path


@pytest.mark.parametrize("shape", [(64, 96), (32, 32), (16, 32)])
def test_linear4bit_rows_shorter_than_a_block_match_bitsandbytes_reference(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    packed, state = BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    linear.weight.data = weight
    ours = Linear4bit.from_linear(linear, "nf4", 64, double_quant=True)
    assert torch.equal(ours.weight, packed)
    assert torch.equal(ours.dequantize(), reference_dequantize_4bit(packed, state))


def test_linear8bit_stores_and_computes_what_bitsandbytes_does():
    linear = seeded_linear()
    ours = Linear8bit.from_linear(linear)
    theirs = bnb_linear8bit(linear)
    assert torch.equal(ours.SCB, theirs.weight.SCB)
    mismatched = (ours.weight != theirs.weight.data).sum().item()
    assert mismatched == 0, (
        f"{mismatched} int8 codes differ from bitsandbytes: formats.quantize_int8 must scale by "
        "(1/SCB)*127 as torch's 127.0/SCB does (reciprocal, then multiply)")
    expected = BF.int8_vectorwise_dequant(theirs.weight.data, theirs.weight.SCB)
    assert torch.equal(ours.dequantize(), expected)
    assert torch.equal(dequantized_weight(theirs), expected)

    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    theirs.train()  # on CPU, training mode is bitsandbytes' dequantize-then-matmul path
    assert max_diff(ours(x), theirs(x)) <= 1e-6
    assert torch.equal(dequantized_weight(theirs), expected)  # its forward moved CB/SCB into .state


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_quantize_model_gives_the_logits_of_its_dequantized_weights(quant_type, double_quant):
    quantized = quantize_model(tiny_llama(), quant_type, 64, double_quant)
    reference = tiny_llama()
    layers = dict(quantized.named_modules())
    replaced = 0
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and is_quantized_linear(layers[name]):
            module.weight.data = dequantized_weight(layers[name])
            replaced += 1
    assert replaced == 14 and isinstance(quantized.lm_head, nn.Linear)  # 7 per layer; lm_head skipped
    ids = token_ids()
    assert max_diff(run(quantized, ids), run(reference, ids)) <= 1e-6
    assert max_diff(run(quantized, ids), run(tiny_llama(), ids)) > 1e-4  # it really is quantized


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def load_bnb_4bit(path, dtype=torch.float32, double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def test_transformers_4bit_model_reads_as_our_quantization(llama_dir):
    loaded = load_bnb_4bit(llama_dir)
    ours = dict(quantize_model(tiny_llama(), "nf4", 64, double_quant=True).named_modules())
    checked = 0
    for name, module in loaded.named_modules():
        if not is_quantized_linear(module):
            continue
        checked += 1
        in_features, out_features = linear_features(module)
        assert (in_features, out_features) == (ours[name].in_features, ours[name].out_features)
        assert tuple(module.weight.shape) == (in_features * out_features // 2, 1)  # packed
        weight = dequantized_weight(module)
        assert torch.equal(weight, reference_dequantize_4bit(module.weight.data, module.weight.quant_state))
        assert torch.equal(weight, ours[name].dequantize())  # same codes and absmax as our quantize_model
        state = quant_state(module)
        assert state.shape == (out_features, in_features) and state.nested is not None
        assert torch.equal(torch.from_numpy(formats.dequantize_4bit(state)), weight)
    assert checked == 14


def test_dequantized_weight_undoes_bitsandbytes_cpu_repacking():
    """On AVX512-BF16 CPUs bitsandbytes repacks codes (and rounds absmax to bf16) at the first eval
    no-grad forward; the seam must still read the weight that layer now multiplies by."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer = bnb_linear4bit(seeded_linear(), "nf4", double_quant=True)
    before = dequantized_weight(layer)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    assert tuple(layer.weight.shape) == (64, 64)  # [out, in/2]: no longer bitsandbytes' storage layout
    after = dequantized_weight(layer)
    assert tuple(layer.weight.shape) == (128 * 64 // 2, 1)
    assert max_diff(after, before) <= before.abs().max().item() * 2 ** -7  # only the bf16 absmax rounding
    assert linear_features(layer) == (128, 64)


def test_requantize_into_writes_each_layers_own_format():
    linear = seeded_linear()
    new_weight = linear.weight.detach() + 0.01 * torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    pairs = [(Linear4bit.from_linear(linear, "nf4", 64, True), bnb_linear4bit(linear, "nf4", True)),
             (Linear8bit.from_linear(linear), bnb_linear8bit(linear).train())]
    for ours, theirs in pairs:
        requantize_into(ours, new_weight)
        requantize_into(theirs, new_weight)
        assert torch.equal(dequantized_weight(ours), dequantized_weight(theirs))
        assert max_diff(dequantized_weight(ours), new_weight) < 0.05
        assert max_diff(ours(x), theirs(x)) <= 1e-6
    assert torch.equal(pairs[0][0].weight, pairs[0][1].weight.data)  # the same new codes
    with pytest.raises(QuantizationError, match=r"\[64, 128\]"):
        requantize_into(pairs[0][0], new_weight.T)


def test_layer_state_survives_half_and_state_dict_round_trip():
    layer = Linear4bit.from_linear(seeded_linear(), "nf4", 64, double_quant=True)
    weight = layer.dequantize()
    layer.half()  # model.half() must not round the quant state
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.dequantize(), weight)
    assert layer(torch.randn(2, 128).half()).dtype == torch.float16
    copy = Linear4bit(128, 64, quant_type="nf4", blocksize=64, double_quant=True)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.dequantize(), weight)
    restored = Linear4bit.from_quant_state(layer.quant_state(), bias=layer.bias)
    assert torch.equal(restored.dequantize(), weight)


def test_seam_helpers_on_plain_and_foreign_layers():
    linear = seeded_linear()
    assert not is_quantized_linear(linear) and linear_features(linear) == (128, 64)
    assert is_quantized_linear(Linear8bit.from_linear(linear))
    assert is_quantized_linear(bnb_linear8bit(linear)) and linear_features(bnb_linear8bit(linear)) == (128, 64)
    with pytest.raises(QuantizationError, match="Conv1d"):
        linear_features(nn.Conv1d(2, 2, 1))
    with pytest.raises(QuantizationError, match="not a 4-bit"):
        quant_state(Linear8bit.from_linear(linear))


def test_quantize_model_bad_input_names_the_layer():
    with pytest.raises(QuantizationError, match="model.layers.0.self_attn.q_proj.*block size 4096"):
        quantize_model(tiny_llama(), "nf4", blocksize=4096)
    with pytest.raises(QuantizationError, match="'int4'"):
        quantize_model(tiny_llama(), "int4")
    with pytest.raises(QuantizationError, match="block size 48"):
        quantize_model(tiny_llama(), "nf4", blocksize=48)


def _param_table(model: nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}


def test_prepare_model_for_kbit_training_matches_peft(llama_dir):
    peft = pytest.importorskip("peft")
    ours = prepare_model_for_kbit_training(load_bnb_4bit(llama_dir, dtype=torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(load_bnb_4bit(llama_dir, dtype=torch.bfloat16))
    table = _param_table(ours)
    assert table == _param_table(theirs)
    assert table["model.norm.weight"] == (torch.float32, False)  # bf16 norms upcast, all frozen
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    embeds = ours.get_input_embeddings()(token_ids())
    assert embeds.requires_grad  # so reentrant checkpoints keep a grad path to the adapters

    ours_q = prepare_model_for_kbit_training(quantize_model(tiny_llama().to(torch.bfloat16)))
    theirs_q = peft.prepare_model_for_kbit_training(quantize_model(tiny_llama().to(torch.bfloat16)),
                                                    use_gradient_checkpointing=False)
    assert _param_table(ours_q) == _param_table(theirs_q)
    assert ours_q.is_gradient_checkpointing  # ours recognises our own 4-bit layers


def test_prepare_model_for_kbit_training_without_checkpointing_support():
    model = nn.Sequential(Linear4bit.from_linear(seeded_linear()))
    with pytest.raises(Exception, match="use_gradient_checkpointing=False"):
        prepare_model_for_kbit_training(model)
    assert prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) is model
