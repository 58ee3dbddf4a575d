"""onnx_peft.quant.formats reproduces bitsandbytes' 4-bit and int8 formats bit for bit on CPU."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from onnx_peft.quant import formats as Q

try:  # the reference: bitsandbytes on CPU (the format tests below need it, the error tests do not)
    import bitsandbytes.functional as F
    import torch
except ImportError:  # pragma: no cover
    F = torch = None

needs_bnb = pytest.mark.skipif(F is None, reason="bitsandbytes (and torch) not installed")


def _weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0, :8] = 0.0          # zeros and a tie-prone constant run
    w[1, :4] = 0.01
    return w


def _bnb_absmax(state) -> np.ndarray:
    if state.nested:
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    return state.absmax.numpy()


@needs_bnb
def test_code_tables_are_bitsandbytes_tables():
    assert np.array_equal(Q.NF4_CODE, F.get_4bit_type("nf4", "cpu").numpy())
    assert np.array_equal(Q.FP4_CODE, F.get_4bit_type("fp4", "cpu").numpy())
    assert np.array_equal(Q.DYNAMIC_CODE, F.create_dynamic_map().numpy())


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_is_bit_identical(quant_type, blocksize, double_quant):
    w = _weight((192, 256))
    packed, ref = F.quantize_4bit(torch.from_numpy(w), blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type=quant_type)

    ours = Q.quantize_4bit(w, quant_type, blocksize, double_quant)

    assert ours.shape == (192, 256) and ours.packed.dtype == np.uint8
    assert np.array_equal(ours.packed, packed.numpy().reshape(-1))
    assert np.array_equal(ours.absmax, _bnb_absmax(ref))
    if double_quant:
        assert np.array_equal(ours.nested["absmax"], ref.absmax.numpy())
        assert np.array_equal(ours.nested["nested_absmax"], ref.state2.absmax.numpy())
        assert np.float32(ours.nested["nested_offset"]) == np.float32(ref.offset.item())
    assert np.array_equal(Q.dequantize_4bit(ours), F.dequantize_4bit(packed, ref).numpy())


@needs_bnb
def test_double_quant_offset_matches_multithreaded_torch_mean():
    rng = np.random.default_rng(3)
    absmax = np.abs(rng.standard_normal(70_000)).astype(np.float32)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            expected = np.float32(torch.from_numpy(absmax).mean().item())
            assert Q.torch_mean_f32(absmax, threads) == expected
    finally:
        torch.set_num_threads(previous)


@needs_bnb
def test_dequantize_when_a_block_spans_rows_matches_bitsandbytes_reference():
    # bitsandbytes' AVX-512 CPU kernel reads the wrong absmax when in_features < blocksize; its
    # portable kernel (the CUDA semantics) is the reference there.
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    w = _weight((64, 32))
    packed, ref = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    expected = default_ops._dequantize_4bit_compute(
        packed.reshape(-1), ref.absmax, ref.code, 64, (64, 32), torch.float32).numpy()
    assert np.array_equal(Q.dequantize_4bit(Q.quantize_4bit(w, "nf4", 64)), expected)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_state_reads_quant_state_and_saved_keys(double_quant):
    w = _weight((64, 128), seed=1)
    packed, ref = F.quantize_4bit(torch.from_numpy(w), blocksize=64,
                                  compress_statistics=double_quant, quant_type="nf4")
    expected = F.dequantize_4bit(packed, ref).numpy()
    saved = {f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in ref.as_dict(packed=True).items()}

    from_object = Q.from_bnb_state(packed, ref)
    from_keys = Q.from_bnb_state(packed, saved, name="model.layers.0.mlp.up_proj.weight")

    for state in (from_object, from_keys):
        assert state.shape == (64, 128) and state.blocksize == 64 and state.quant_type == "nf4"
        assert (state.nested is not None) == double_quant
        assert np.array_equal(Q.dequantize_4bit(state), expected)


@needs_bnb
def test_to_bnb_state_dict_round_trips_through_bitsandbytes():
    w = _weight((64, 128), seed=2)
    ours = Q.quantize_4bit(w, "fp4", 64, double_quant=True)
    saved = {k: torch.from_numpy(np.array(v)) for k, v in Q.to_bnb_state_dict(ours, "w").items()}
    state = F.QuantState.from_dict({k: v for k, v in saved.items() if k != "w"}, device="cpu")
    assert np.array_equal(F.dequantize_4bit(saved["w"], state).numpy(), Q.dequantize_4bit(ours))


@needs_bnb
def test_linear4bit_weight_is_read_exactly():
    bnb = pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")
    state = Q.from_bnb_state(layer.weight.data, layer.weight.quant_state)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
    assert np.array_equal(Q.dequantize_4bit(state), expected)
    assert np.array_equal(state.packed, Q.quantize_4bit(linear.weight.detach().numpy(), "nf4", 64).packed)


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 32), (33, 77)])
def test_int8_rowwise_is_bit_identical(shape):
    w = _weight(shape, seed=4)
    w[3] = 0.0
    cb, scb, _ = F.int8_vectorwise_quant(torch.from_numpy(w))
    our_cb, our_scb = Q.quantize_int8(w)
    assert np.array_equal(our_cb, cb.numpy()) and np.array_equal(our_scb, scb.numpy())
    assert np.array_equal(Q.dequantize_int8(our_cb, our_scb), F.int8_vectorwise_dequant(cb, scb).numpy())


def test_bad_input_raises_errors_that_name_the_layer():
    w = _weight((8, 12))
    with pytest.raises(Q.QuantizationError, match="q_proj.*does not divide"):
        Q.quantize_4bit(w, "nf4", 64, name="q_proj")
    with pytest.raises(Q.QuantizationError, match="q_proj.*unknown 4-bit quant type 'nf3'"):
        Q.quantize_4bit(_weight((8, 64)), "nf3", 64, name="q_proj")
    with pytest.raises(Q.QuantizationError, match="block size 48"):
        Q.quantize_4bit(_weight((8, 96)), "nf4", 48)
    with pytest.raises(Q.QuantizationError, match="2-D"):
        Q.quantize_4bit(np.zeros(64, np.float32), "nf4", 64)
    state = Q.quantize_4bit(_weight((8, 64)), "nf4", 64)
    with pytest.raises(Q.QuantizationError, match="down_proj.weight.*missing"):
        Q.from_bnb_state(state.packed, {"down_proj.weight.absmax": state.absmax}, name="down_proj.weight")
    with pytest.raises(Q.QuantizationError, match="does not belong"):
        bad = Q.to_bnb_state_dict(Q.quantize_4bit(_weight((16, 64)), "nf4", 64), "w")
        Q.from_bnb_state(state.packed, {k: v for k, v in bad.items() if k != "w"}, name="w")
    assert issubclass(Q.QuantizationError, ValueError)


def test_formats_module_does_not_import_torch():
    code = "import sys, onnx_peft.quant.formats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
