"""Hostile and broken inputs to the readers (issue 13): a typed error, fast, in bounded memory.

Configs whose values PEFT's dataclasses would not accept, regexes that backtrack forever,
safetensors headers that lie, npz zip bombs and pickles, big-endian arrays, unparsable
.onnx_adapter files, corrupt contract / multi-adapter metadata. Every file here is tiny and
synthetic: a "4 GB" tensor is a zip directory entry that claims it.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.lib import format as npy_format
from test_runtime import DIMS, MODULES, build_slot_model, make_adapter, reference

from onnx_peft import npz as npz_module
from onnx_peft.checkpoint import read_safetensors, safetensors_bytes
from onnx_peft.config import AdapterConfig
from onnx_peft.errors import (
    AdapterConfigError,
    CheckpointError,
    IncompatibleAdapterError,
    ModelFileError,
    OnnxPeftError,
)
from onnx_peft.formats import (
    NPZ_FINGERPRINT_KEY,
    load_adapter_file,
    read_peft_adapter,
    save_adapter_file,
)
from onnx_peft.graph.banks import MULTI_ADAPTER_KEY, BankEntry, MultiLayout
from onnx_peft.graph.contract import (
    CONTRACT_KEY,
    Contract,
    Slot,
    check_adapter,
    header_check,
    read_contract,
)
from onnx_peft.targets import checked_pattern, is_target, layer_index, pattern_value

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}


def write_config(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_slot_model(tmp_path_factory.mktemp("hostile") / "tiny.onnx")


# -- configs: values PEFT would not accept -------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", float("nan"), "lora_alpha"),
    ("lora_alpha", float("inf"), "lora_alpha"),
    ("lora_alpha", 1e308, "lora_alpha"),
    ("lora_alpha", True, "lora_alpha"),
    ("lora_alpha", "16", "lora_alpha"),
    ("use_rslora", "no", "use_rslora"),
    ("use_dora", 1, "use_dora"),
    ("fan_in_fan_out", "false", "fan_in_fan_out"),
    ("rank_pattern", {"q_proj": 4.5}, "rank_pattern"),
    ("rank_pattern", {"q_proj": True}, "rank_pattern"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": float("nan")}, "alpha_pattern"),
    ("alpha_pattern", {"q_proj": 1e9}, "alpha_pattern"),
    ("lora_dropout", "0.1", "lora_dropout"),
    ("layers_to_transform", [0, 1.5], "layers_to_transform"),
    ("target_modules", {"q_proj": 1}, "target_modules"),
    ("target_modules", [["q_proj"]], "target_modules"),
    ("r", 2**70, "r"),
])
def test_lora_values_peft_would_refuse_name_the_field_and_file(tmp_path, field, value, message):
    folder = write_config(tmp_path / "a", {**LORA, field: value})  # json writes NaN/Infinity literals
    with pytest.raises(AdapterConfigError, match=message) as info:
        AdapterConfig.from_pretrained(folder)
    assert "adapter_config.json" in str(info.value)


@pytest.mark.parametrize("data, message", [
    ({"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": ["k"], "fan_in_fan_out": "yes"},
     "fan_in_fan_out"),
    ({"peft_type": "LOHA", "r": 4, "alpha": True, "target_modules": ["q"]}, "alpha"),
    ({"peft_type": "LOKR", "r": 4, "alpha": float("inf"), "target_modules": ["q"]}, "alpha"),
    ({"peft_type": "VERA", "r": 4, "target_modules": ["q"], "d_initial": float("nan")}, "d_initial"),
    ({"peft_type": "BOFT", "boft_block_size": 4.5, "target_modules": ["q"]}, "boft_block_size"),
    ({"peft_type": "FOURIERFT", "n_frequency": 8, "scaling": float("-inf"), "target_modules": ["q"]}, "scaling"),
    ({"peft_type": "ADALORA", "lora_alpha": float("nan"), "total_step": 10, "target_modules": ["q"]},
     "lora_alpha"),
])
def test_other_methods_refuse_ill_typed_values(data, message):
    with pytest.raises(AdapterConfigError, match=message):
        AdapterConfig.from_dict(data, source="adapter_config.json")


def test_peft_valid_values_still_load():
    config = AdapterConfig.from_dict({**LORA, "lora_alpha": 16.5, "lora_dropout": 0, "rank_pattern": {"q_proj": 2},
                                      "alpha_pattern": {"v_proj": 32}, "layers_to_transform": None,
                                      "use_rslora": True, "init_lora_weights": "gaussian"})
    assert config.rank_for("model.layers.0.q_proj") == 2 and config.alpha_for("model.layers.0.v_proj") == 32
    assert config.scaling_for("model.layers.0.k_proj") == pytest.approx(16.5 / 2)  # rsLoRA: alpha / sqrt(4)
    old = AdapterConfig.from_dict({**LORA, "rank_pattern": None, "alpha_pattern": None})  # older PEFT writes null
    assert old.rank_for("model.layers.0.q_proj") == 4


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('"LORA"', "JSON object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (json.dumps({**LORA, "target_modules": {"nested": {"deeper": [1]}}}), "target_modules"),
    (json.dumps({**LORA, "peft_type": ["LORA"]}), "peft_type"),
    (b"\xff\xfe\x00garbage".decode("latin-1"), "not valid JSON"),
])
def test_corrupt_adapter_config_json_names_the_file(tmp_path, text, message):
    folder = write_config(tmp_path / "a", text)
    with pytest.raises(AdapterConfigError, match=message) as info:
        AdapterConfig.from_pretrained(folder)
    assert str(folder / "adapter_config.json") in str(info.value)


# -- regexes that backtrack forever --------------------------------------------------------------
HOSTILE = ["(.*.*)*z", "(a|a)*z", "(a+)+$", "(x*)*y", "(?:q|q.)*z", ".*.*.*.*.*.*z"]


@pytest.mark.parametrize("field, value", [
    ("target_modules", "(.*.*)*z"),
    ("exclude_modules", "(a|a)*z"),
    ("rank_pattern", {"(a+)+$": 2}),
    ("alpha_pattern", {"(x*)*y": 2}),
    ("layers_pattern", ["(.*.*)*z"]),
    ("modules_to_save", ["(?:q|q.)*z"]),
    ("target_modules", ".*.*.*.*.*.*z"),
])
def test_catastrophic_patterns_are_refused_in_well_under_a_second(tmp_path, field, value):
    data = {**LORA, field: value}
    if field == "layers_pattern":
        data["layers_to_transform"] = [0]
    folder = write_config(tmp_path / "a", data)
    start = time.perf_counter()
    with pytest.raises(AdapterConfigError, match=field) as info:
        AdapterConfig.from_pretrained(folder)
    assert time.perf_counter() - start < 1.0
    assert "refused" in str(info.value) and "adapter_config.json" in str(info.value)


@pytest.mark.parametrize("pattern", ["(", "q_proj)", "[z-a]", "a{2,1}", r"(?P<idx>x)\1"])
def test_invalid_or_backreferencing_patterns_are_typed_errors(pattern):
    with pytest.raises(AdapterConfigError, match="target_modules"):
        AdapterConfig.from_dict({**LORA, "target_modules": pattern})


def test_matching_helpers_refuse_hostile_patterns_even_without_validate():
    key = "model.layers.0.self_attn." + "a" * 40
    start = time.perf_counter()
    for pattern in HOSTILE:
        with pytest.raises(AdapterConfigError):
            is_target(key, SimpleNamespace(target_modules=pattern, exclude_modules=None, modules_to_save=None))
        with pytest.raises(AdapterConfigError):
            pattern_value({pattern: 2}, key, 4)
        with pytest.raises(AdapterConfigError):
            layer_index(key, pattern)
    assert time.perf_counter() - start < 1.0


def test_peft_style_patterns_match_as_before():
    keys = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.vision.layers.0.q_proj",
            "model.layers.10.mlp.up_proj"]

    def targets(pattern):
        config = SimpleNamespace(target_modules=pattern, exclude_modules=None, modules_to_save=None)
        return [k for k in keys if is_target(k, config)]

    assert targets(r".*\.(q|v)_proj") == keys[:3]
    assert targets(r"^(?!.*vision).*(q_proj|v_proj)$") == keys[:2]
    assert targets(r"^(?:(?!vision).)*q_proj$") == keys[:1]
    assert targets(r"model.layers.\d+.mlp.up_proj") == keys[3:]
    assert pattern_value({"q_proj": 2, r"layers\.1\..*": 3}, keys[1], 8) == 3
    assert pattern_value({"q_proj": 2}, keys[0], 8) == 2 and pattern_value({"q_proj": 2}, keys[3], 8) == 8
    assert layer_index(keys[3], "layers") == 10 and layer_index(keys[2], ["vision.layers"]) == 0
    assert checked_pattern("(?:.*\\.)?k_proj").fullmatch("a.k_proj")


# -- safetensors headers -------------------------------------------------------------------------
def raw_safetensors(path: Path, header, body: bytes = b"") -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, message", [
    ([GOOD], "not an object"),
    ({"t": [1, 2]}, "'t'.*must be an object"),
    ({"t": {**GOOD, "dtype": 5}}, "'t'.*'dtype' must be a string"),
    ({"t": {**GOOD, "dtype": "C64"}}, "'t'.*unsupported dtype"),
    ({"t": {**GOOD, "shape": "2"}}, "'t'.*'shape'"),
    ({"t": {**GOOD, "shape": [True, 2]}}, "'t'.*'shape'"),
    ({"t": {**GOOD, "shape": [-2]}}, "'t'.*'shape'"),
    ({"t": {**GOOD, "shape": [2**40, 2**40]}}, "'t'.*needs"),
    ({"t": {**GOOD, "data_offsets": [0]}}, "'t'.*'data_offsets'"),
    ({"t": {**GOOD, "data_offsets": [8, 0]}}, "'t'"),
    ({"t": {**GOOD, "data_offsets": [0, 8.0]}}, "'t'.*'data_offsets'"),
    ({"t": {**GOOD, "data_offsets": [16, 24]}}, "'t' lies outside"),
    ({"t": {k: v for k, v in GOOD.items() if k != "shape"}}, "'t'.*'shape'"),
    ({"__metadata__": ["x"], "t": GOOD}, "__metadata__"),
    ({"__metadata__": {"k": 1}, "t": GOOD}, "__metadata__"),
    ({"a": GOOD, "b": GOOD}, "'a' and 'b' share bytes"),
    ({"a": GOOD, "b": {**GOOD, "data_offsets": [4, 12]}}, "share bytes"),
    ('{"t": ' * 50_000, "corrupt safetensors header"),
])
def test_lying_safetensors_headers_name_the_file_and_key(tmp_path, header, message):
    path = raw_safetensors(tmp_path / "a.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match=message) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_adapter_file(path)


def test_header_size_and_entry_count_are_capped_before_parsing(tmp_path, monkeypatch):
    from onnx_peft import checkpoint

    big = raw_safetensors(tmp_path / "big.safetensors", " " * (checkpoint.MAX_HEADER_BYTES + 1))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        read_safetensors(big)
    assert time.perf_counter() - start < 0.5
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)
    many = raw_safetensors(tmp_path / "many.safetensors",
                           {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(4)})
    with pytest.raises(CheckpointError, match="4 tensors, more than the limit of 3"):
        read_safetensors(many)


def test_an_i32_header_on_float_bytes_is_read_as_declared_and_refused_by_the_contract(tmp_path, model_path):
    from onnx_peft.runtime import AdapterSession

    tensors = make_adapter(4, 1)
    name = "model.l0.lora_A.weight"
    tensors[name] = tensors[name].view(np.int32)  # same bytes, I32 in the header
    path = tmp_path / "a.safetensors"
    path.write_bytes(safetensors_bytes(tensors))
    loaded, _ = load_adapter_file(path)
    assert loaded[name].dtype == np.int32 and np.array_equal(loaded[name], tensors[name])
    session = AdapterSession(model_path)
    with pytest.raises(IncompatibleAdapterError, match=f"{name}.*int32.*float32"):
        session.load_adapter("a", path)
    with pytest.raises(IncompatibleAdapterError, match="int32"):  # the check runs on the header, before the data
        load_adapter_file(path, check=lambda header: check_adapter(session.contract, header, source=str(path)))


def test_convert_adapters_refuses_i32_slots_and_header_check_runs_before_data(tmp_path, model_path):
    from onnx_peft.convert import convert_adapters
    from onnx_peft.runtime import AdapterSession

    tensors = make_adapter(4, 1)
    name = "model.l1.lora_B.weight"
    tensors[name] = tensors[name].view(np.int32)
    path = tmp_path / "a.safetensors"
    path.write_bytes(safetensors_bytes(tensors))
    with pytest.raises(IncompatibleAdapterError, match=f"{name}.*int64"):
        convert_adapters(path, model_path, output_path=tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    contract = AdapterSession(model_path).contract
    with pytest.raises(IncompatibleAdapterError, match="int64"):
        load_adapter_file(path, check=header_check(contract, str(path), converting=True))
    fp16 = {k: v.astype(np.float16) for k, v in make_adapter(4, 1).items()}  # converting casts floats: fine
    np.savez(tmp_path / "h.npz", **fp16)
    load_adapter_file(tmp_path / "h.npz", check=header_check(contract, "h.npz", converting=True))
    with pytest.raises(IncompatibleAdapterError, match="float16"):
        load_adapter_file(tmp_path / "h.npz", check=header_check(contract, "h.npz"))


def test_files_without_tensors_are_refused(tmp_path, model_path):
    from onnx_peft.runtime import AdapterSession

    empty = raw_safetensors(tmp_path / "empty.safetensors", {"__metadata__": {"format": "np"}})
    with pytest.raises(CheckpointError, match="no adapter tensors"):
        load_adapter_file(empty)
    folder = write_config(tmp_path / "peft", LORA)
    raw_safetensors(folder / "adapter_model.safetensors", {})
    with pytest.raises(CheckpointError, match="hold no tensors"):
        read_peft_adapter(folder)
    with pytest.raises(CheckpointError, match="no adapter tensors"):
        AdapterSession(model_path).load_adapter("empty", empty)
    from onnx_peft.convert import convert_adapters

    for source in (empty, folder):
        with pytest.raises(CheckpointError, match="no (adapter )?tensors"):
            convert_adapters(source, model_path, output_path=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# -- npz -----------------------------------------------------------------------------------------
def npy_bytes(shape, descr="<f4", body: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue() + body


def claim_size(path: Path, claimed: int) -> None:
    """Rewrite the (only) member's uncompressed size in the local header and the zip directory."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 22, claimed)
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, claimed)
    path.write_bytes(bytes(data))


def test_a_deflated_4gb_claim_is_refused_from_the_zip_directory(tmp_path):
    path = tmp_path / "bomb.npz"
    shape = (1_000_000_000,)  # 4e9 bytes of float32
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", npy_bytes(shape, body=b"\0" * 4096))
    claim_size(path, len(npy_bytes(shape)) + 4 * shape[0])
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_adapter_file(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 20 * 2**20


def test_a_really_deflated_zero_tensor_is_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setattr(npz_module, "INFLATE_FLOOR", 2**16)
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, w=np.zeros(2**20, np.float32))
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_adapter_file(path)


def test_an_npy_header_claiming_more_than_the_member_holds_is_refused(tmp_path):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", npy_bytes((2**40,), body=b"\0" * 16))
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="claims shape"):
        load_adapter_file(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20


@pytest.mark.parametrize("member, data, message", [
    ("evil.pkl", b"\x80\x04K\x01.", "not a .npy array"),
    ("w.npy", npy_bytes((1,), "|O", b"\0" * 8), "object"),
    ("w.npy", npy_bytes((2,), "<U4", b"\0" * 32), "float, int or bool"),
    ("w.npy", npy_bytes((2,), "<c8", b"\0" * 16), "float, int or bool"),
    ("w.npy", npy_bytes((1,), [("a", "<f4")], b"\0" * 4), "structured"),
    ("w.npy", b"\x93NUMPY\x03\x00" + b"\0" * 20, "format"),
    ("w.npy", b"not an npy file at all", "not a readable"),
    (NPZ_FINGERPRINT_KEY + ".npy", npy_bytes((), "<f4", b"\0" * 4), "0-d string"),
])
def test_npz_members_that_are_not_plain_arrays_are_refused(tmp_path, member, data, message):
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr("ok.npy", npy_bytes((2,), body=b"\0" * 8))
    with pytest.raises(CheckpointError, match=message):
        load_adapter_file(path)


def test_npz_directory_is_capped_before_zipfile_parses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(npz_module, "MAX_MEMBERS", 2)
    path = tmp_path / "many.npz"
    np.savez(path, a=np.zeros(1), b=np.zeros(1), c=np.zeros(1))
    with pytest.raises(CheckpointError, match="3 members"):
        load_adapter_file(path)


def test_big_endian_npz_loads_in_native_order_and_gives_the_right_logits(tmp_path, model_path):
    from onnx_peft.runtime import AdapterSession

    tensors = make_adapter(4, 2)
    path = tmp_path / "be.npz"
    np.savez(path, **{k: v.astype(">f4") for k, v in tensors.items()})
    loaded, _ = load_adapter_file(path)
    for name, value in tensors.items():
        assert loaded[name].dtype == np.float32 and loaded[name].dtype.isnative
        assert np.array_equal(loaded[name], value)
    session = AdapterSession(model_path)
    session.load_adapter("be", path)
    x = np.random.default_rng(3).standard_normal((2, 3, DIMS[0])).astype(np.float32)
    out = session.run(None, {"x": x}, adapter="be")[0]
    assert np.abs(out - reference(x, tensors)).max() <= 1e-5


def test_npz_header_is_checked_against_the_contract_before_data(tmp_path, model_path):
    from onnx_peft.runtime import AdapterSession

    contract = AdapterSession(model_path).contract
    path = tmp_path / "wide.npz"
    tensors = make_adapter(4, 3)
    tensors[f"{MODULES[0]}.lora_A.weight"] = np.zeros((DIMS[0] + 1, 4), np.float32)
    np.savez(path, **tensors)
    seen = []

    def check(header):
        seen.append(header)
        check_adapter(contract, header, source=str(path))

    with pytest.raises(IncompatibleAdapterError, match="shape"):
        load_adapter_file(path, check=check)
    assert seen and all(isinstance(shape, tuple) for shape, _ in seen[0].values())


# -- .onnx_adapter -------------------------------------------------------------------------------
def test_unparsable_onnx_adapter_files_are_checkpoint_errors(tmp_path):
    good = save_adapter_file(tmp_path / "a.onnx_adapter", make_adapter(4, 1), "abcd1234")
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    variants = [b"", b"\0" * 64, data[: len(data) // 2], data[:16]]
    for _ in range(30):
        flipped = bytearray(data)
        for index in rng.integers(0, len(data), 4):
            flipped[index] = int(rng.integers(0, 256))
        variants.append(bytes(flipped))
    for i, variant in enumerate(variants):
        path = tmp_path / f"m{i}.onnx_adapter"
        path.write_bytes(variant)
        try:
            tensors, _ = load_adapter_file(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
        else:
            assert tensors and all(isinstance(v, np.ndarray) for v in tensors.values())


# -- model metadata ------------------------------------------------------------------------------
GOOD_SLOT = {"name": "m.lora_A.weight", "dtype": "float32", "shape": [4, "lora_r"], "module": "m"}


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    (json.dumps({"slots": 5}), "'slots' must be a list"),
    (json.dumps({"slots": [5]}), r"slots\[0\] must be an object"),
    (json.dumps({"slots": [{**GOOD_SLOT, "name": 1}]}), r"slots\[0\].name"),
    (json.dumps({"slots": [{k: v for k, v in GOOD_SLOT.items() if k != "shape"}]}), r"slots\[0\].shape"),
    (json.dumps({"slots": [{**GOOD_SLOT, "shape": [-1]}]}), r"slots\[0\].shape"),
    (json.dumps({"slots": [{**GOOD_SLOT, "dtype": "float99"}]}), r"slots\[0\].dtype"),
    (json.dumps({"slots": [{**GOOD_SLOT, "method": None}]}), r"slots\[0\].method"),
    (json.dumps({"slots": [], "version": "1"}), "version"),
    ("[" * 100_000, "not valid JSON"),
])
def test_corrupt_contract_metadata_names_the_model_and_key(text, message):
    with pytest.raises(ModelFileError, match=message) as info:
        read_contract({CONTRACT_KEY: text}, source="tiny.onnx")
    assert "tiny.onnx" in str(info.value) and CONTRACT_KEY in str(info.value)


def test_contract_round_trip_and_unknown_fields_still_work():
    contract = Contract([Slot("m.lora_A.weight", "float32", (4, "lora_r.m"), "m")], fingerprint="ab")
    data = json.loads(contract.to_json())
    data["slots"][0]["future_field"] = 1
    assert Contract.from_json(json.dumps(data)) == contract


GOOD_BANK = {"slot": "m.lora_A.weight", "bank": "m.lora_A.bank", "kind": "slot", "module": "m", "dims": [4, 8],
             "dtype": "float32", "shape": [4, "lora_r"], "default": "zeros"}


@pytest.mark.parametrize("text, message", [
    ("nope", "not valid JSON"),
    ("7", "must be a JSON object"),
    (json.dumps({"banks": {"a": 1}}), "'banks' must be a list"),
    (json.dumps({"banks": ["x"]}), r"banks\[0\] must be an object"),
    (json.dumps({"banks": [{**GOOD_BANK, "dims": [4]}]}), r"banks\[0\].dims"),
    (json.dumps({"banks": [{**GOOD_BANK, "kind": 3}]}), r"banks\[0\].kind"),
    (json.dumps({"banks": [{**GOOD_BANK, "shape": "4"}]}), r"banks\[0\].shape"),
    (json.dumps({"banks": [], "ids_input": 5}), "ids_input"),
])
def test_corrupt_multi_adapter_metadata_names_the_model_and_key(text, message):
    with pytest.raises(ModelFileError, match=message) as info:
        MultiLayout.from_json(text, source="multi.onnx")
    assert "multi.onnx" in str(info.value) and MULTI_ADAPTER_KEY in str(info.value)
    layout = MultiLayout(banks=[BankEntry(**{**GOOD_BANK, "dims": (4, 8), "shape": (4, "lora_r")})])
    assert MultiLayout.from_json(layout.to_json()) == layout


def test_a_session_on_a_model_with_a_corrupt_contract_is_a_typed_error(tmp_path, model_path):
    import onnx

    from onnx_peft.runtime import AdapterSession

    model = onnx.load(model_path)
    for prop in model.metadata_props:
        if prop.key == CONTRACT_KEY:
            prop.value = '{"slots": [{"name": 3}]}'
    path = tmp_path / "corrupt.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxPeftError, match=CONTRACT_KEY):
        AdapterSession(path)


# -- found by tests/fuzz -------------------------------------------------------------------------
def test_inspect_checks_the_multi_adapter_metadata_it_shows(tmp_path, model_path):
    import onnx

    from onnx_peft.inspect import inspect_path

    model = onnx.load(model_path)
    prop = model.metadata_props.add()
    prop.key, prop.value = MULTI_ADAPTER_KEY, json.dumps({"banks": [None]})  # was: KeyError 'ids_input'
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match=r"banks\[0\]"):
        inspect_path(tmp_path / "m.onnx")


def _lying_initializer(path: Path, source: Path, lie: str) -> Path:
    import onnx
    from onnx import TensorProto

    model = onnx.load(source)
    tensor = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    if lie == "dims":
        tensor.dims.append(2)
    elif lie == "dtype":
        tensor.data_type = TensorProto.DOUBLE
    else:  # a string tensor whose bytes sit in raw_data: it reads back as no strings
        tensor.data_type = TensorProto.STRING
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("lie", ["dims", "dtype", "string"])
def test_an_initializer_whose_bytes_do_not_fill_its_shape_is_refused_at_load(tmp_path, model_path, lie):
    from onnx_peft.graph.io import load_model
    from onnx_peft.passes.multi_adapter import multi_adapter

    path = _lying_initializer(tmp_path / "lie.onnx", model_path, lie)
    with pytest.raises(ModelFileError, match="tensor .* the model file is corrupt") as info:
        load_model(path)
    assert str(path) in str(info.value)
    with pytest.raises(ModelFileError):  # was: re-emitted as a tensor nobody can read back
        multi_adapter(path, tmp_path / "multi")
    assert not (tmp_path / "multi").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".onnx_adapter"])
def test_adapter_files_with_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, suffix):
    tensors = make_adapter(4, 1)
    name = f"{MODULES[1]}.lora_B.weight"
    tensors[name][0, 0] = np.inf if suffix == ".npz" else np.nan
    path = save_adapter_file(tmp_path / f"a{suffix}", tensors, "abcd")
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        load_adapter_file(path)
    assert name in str(info.value) and str(path) in str(info.value)


def test_a_peft_dir_with_nan_weights_is_refused(tmp_path):
    from onnx_peft.checkpoint import write_safetensors

    folder = write_config(tmp_path / "a", {**LORA, "target_modules": ["fc"], "r": 2})
    write_safetensors(folder / "adapter_model.safetensors",
                      {"base_model.model.fc.lora_A.weight": np.full((2, 4), np.nan, np.float32),
                       "base_model.model.fc.lora_B.weight": np.zeros((3, 2), np.float32)})
    with pytest.raises(CheckpointError, match="lora_A.weight' holds 8 NaN"):
        read_peft_adapter(folder)


def test_insert_into_a_model_with_slots_or_a_corrupt_contract_is_a_typed_error(tmp_path, model_path):
    import onnx
    from test_no_data_loss import peft_dir

    from onnx_peft.passes.insert_adapters import insert_adapters

    adapter = peft_dir(tmp_path / "adapter")
    with pytest.raises(IncompatibleAdapterError, match="already has adapter slots"):  # was: PreconditionError
        insert_adapters(model_path, {"a": adapter}, tmp_path / "out1")
    model = onnx.load(model_path)
    next(p for p in model.metadata_props if p.key == CONTRACT_KEY).value = "[" * 100_000
    onnx.save(model, tmp_path / "corrupt.onnx")
    with pytest.raises(ModelFileError, match=CONTRACT_KEY):
        insert_adapters(tmp_path / "corrupt.onnx", {"a": adapter}, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_prompt_metadata_nested_past_the_recursion_limit_is_a_typed_error():
    from onnx_peft.prompt_feeds import PROMPT_KEY, PromptLayout

    with pytest.raises(IncompatibleAdapterError, match="RecursionError"):  # was: RecursionError
        PromptLayout.from_metadata({PROMPT_KEY: "[" * 100_000 + "]" * 100_000})
