"""The session flags of infer, bench and serve: ``--device``, ``--provider-option``, ``--tf32``,
``--strategy``. They reach AdapterSession (and the serve factory) unchanged, work anywhere on
the line, and every bad value is one line in the flags the user typed (exit 1; a malformed
``--provider-option`` is a usage error, exit 2). This machine's onnxruntime has no CUDA, so
``--device cuda`` is the failure to check, and CPU the device to run on.

The model is built by hand in the slot layout: ``input_ids [batch, seq]`` -> Gather of an
embedding ``E [100, 8]`` -> one LoRA site ``h W + (h A) B`` -> ``last_hidden_state [batch, seq, 4]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_peft.cli import build_parser, main
from onnx_peft.cli.args import session_kwargs
from onnx_peft.errors import RuntimeSessionError
from onnx_peft.formats import save_adapter_file
from onnx_peft.graph.contract import Contract, Slot, weight_fingerprint, write_contract
from onnx_peft.runtime.providers import CPU, CUDA

# the CLI's options are fresh per session, so the base twin is asked for whenever CUDA is there
CUDA_HERE = True if CUDA in ort.get_available_providers() else None

VOCAB, HIDDEN, OUT, RANK = 100, 8, 4, 2  # bench draws input_ids below 100
MODULE = "model.proj"
IDS = [[3, 1, 4, 1, 5]]


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"embed": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
            "W": (rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
            "A": (rng.standard_normal((HIDDEN, RANK)) * 0.3).astype(np.float32),
            "B": (rng.standard_normal((RANK, OUT)) * 0.3).astype(np.float32)}


def _build(folder: Path) -> Path:
    """A deploy folder: ``model.onnx`` (feature-extraction), ``adapters/style.onnx_adapter``."""
    w = _weights()
    a, b = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", f"{MODULE}.weight"], ["base"]),
             helper.make_node("MatMul", ["h", a], ["ha"]),
             helper.make_node("MatMul", ["ha", b], ["hab"]),
             helper.make_node("Add", ["base", "hab"], ["last_hidden_state"])]
    inits = [numpy_helper.from_array(w["embed"], "embed"), numpy_helper.from_array(w["W"], f"{MODULE}.weight"),
             numpy_helper.from_array(np.zeros((HIDDEN, 0), np.float32), a),
             numpy_helper.from_array(np.zeros((0, OUT), np.float32), b)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(a, TensorProto.FLOAT, [HIDDEN, "lora_r"]),
              helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_r", OUT])]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", OUT])
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, [output], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    contract = Contract(slots=[Slot(a, "float32", (HIDDEN, "lora_r"), MODULE),
                               Slot(b, "float32", ("lora_r", OUT), MODULE)],
                        fingerprint=weight_fingerprint({MODULE: w["W"].T}))
    props: dict[str, str] = {}
    write_contract(props, contract)
    helper.set_model_props(model, props)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "export_info.json").write_text(json.dumps({"task": "feature-extraction"}))
    save_adapter_file(folder / "adapters" / "style.onnx_adapter", {a: w["A"], b: w["B"]}, contract.fingerprint)
    return folder


def _reference(adapter: bool) -> np.ndarray:
    """``last_hidden_state`` of IDS in float64: ``E[ids] W (+ E[ids] A B)``."""
    w = {k: v.astype(np.float64) for k, v in _weights().items()}
    h = w["embed"][np.array(IDS)]
    return h @ w["W"] + ((h @ w["A"]) @ w["B"] if adapter else 0)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("providers") / "deploy")


def _printed(out: str) -> np.ndarray:
    """The first values infer prints: ``last_hidden_state [1, 5, 4]: [v0 v1 ...]``."""
    found = re.search(r"last_hidden_state \[1, 5, 4\]: \[([^\]]*)\]", out)
    assert found, out
    return np.array(found.group(1).split(), dtype=np.float64)


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- infer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_infer_on_cpu_with_the_flag_before_or_after_the_model(deploy, capsys, where):
    adapter = f"style={deploy / 'adapters' / 'style.onnx_adapter'}"
    flags = ["--device", "cpu", "--strategy", "slots"]
    rest = [str(deploy / "model.onnx"), "--adapter", adapter, "--input-ids", "3,1,4,1,5"]
    argv = ["infer", *flags, *rest] if where == "before" else ["infer", *rest, *flags]
    assert main(argv) == 0
    printed = _printed(capsys.readouterr().out)
    expected = _reference(adapter=True).reshape(-1)[:6]
    assert np.abs(printed - expected).max() < 1e-4  # printed with 5 decimals
    assert np.abs(printed - _reference(adapter=False).reshape(-1)[:6]).max() > 1e-2  # the adapter is on


def test_infer_device_cuda_without_cuda_is_one_line_naming_cuda(deploy, capsys):
    assert main(["infer", str(deploy / "model.onnx"), "--input-ids", "1,2", "--device", "cuda"]) == 1
    line = _stderr_line(capsys)
    assert line.startswith("onnx-peft infer: error: --device cuda ")
    assert "CUDAExecutionProvider" in line and "--device cpu" in line  # what is missing, and the way out


def test_provider_option_for_cuda_with_device_cpu_names_the_option(deploy, capsys):
    argv = ["infer", str(deploy / "model.onnx"), "--input-ids", "1,2", "--provider-option", "foo=1", "--device", "cpu"]
    assert main(argv) == 1
    line = _stderr_line(capsys)
    assert line.startswith("onnx-peft infer: error: --provider-option foo=1: ")
    assert CUDA in line and "--device cpu" in line


def test_provider_option_the_cpu_provider_does_not_take_names_it(deploy, capsys):
    argv = ["infer", str(deploy / "model.onnx"), "--input-ids", "1,2", "--provider-option", "cpu:foo=1"]
    assert main(argv) == 1
    line = _stderr_line(capsys)
    assert line.startswith("onnx-peft infer: error: ")
    assert f"{CPU} rejected --provider-option 'foo'" in line


@pytest.mark.parametrize("value", ["noequals", "=1", "cuda:=1"])
def test_malformed_provider_option_is_a_usage_error(deploy, capsys, value):
    argv = ["infer", str(deploy / "model.onnx"), "--input-ids", "1,2", f"--provider-option={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"argument --provider-option: {value!r}: expected KEY=VALUE or PROVIDER:KEY=VALUE" in err


@pytest.mark.parametrize("flag", [["--device", "gpu"], ["--strategy", "fastest"]])
def test_unknown_device_or_strategy_is_a_usage_error(deploy, capsys, flag):
    assert main(["infer", str(deploy / "model.onnx"), "--input-ids", "1,2", *flag]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- one definition for all three commands --------------------------------------------------------
@pytest.mark.parametrize("command", [["infer", "m.onnx", "--input-ids", "1"], ["bench", "m.onnx"], ["serve", "d"]])
def test_session_flags_become_adapter_session_keywords(command):
    args = build_parser().parse_args([*command, "--tf32", "--strategy", "merge", "--device", "cuda",
                                      "--provider-option", "gpu_mem_limit=1000", "--provider-option",
                                      "cuda:arena_extend_strategy=kSameAsRequested", "--debug"])
    kwargs = session_kwargs(args)
    assert kwargs.pop("session_options").log_severity_level == 2  # --debug: ORT's own log shown
    assert kwargs == {"device": "cuda", "tf32": True, "strategy": "merge", "base_session": CUDA_HERE,
                      "provider_options": {CUDA: {"gpu_mem_limit": "1000",
                                                  "arena_extend_strategy": "kSameAsRequested"}}}


def test_session_flag_defaults_are_the_api_defaults():
    kwargs = session_kwargs(build_parser().parse_args(["bench", "m.onnx"]))
    assert kwargs.pop("session_options").log_severity_level == 4
    assert kwargs == {"device": "auto", "provider_options": None, "tf32": False, "strategy": "auto",
                      "base_session": CUDA_HERE}
    cpu = session_kwargs(build_parser().parse_args(["bench", "m.onnx", "--device", "cpu"]))
    assert cpu["base_session"] is None  # the twin stays off on CPU


# -- bench ---------------------------------------------------------------------------------------
def test_bench_on_cpu(deploy, capsys):
    argv = ["bench", str(deploy / "model.onnx"), "--adapter", f"style={deploy / 'adapters' / 'style.onnx_adapter'}",
            "--runs", "2", "--warmup", "1", "--seq", "4", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"on {CPU}, strategy auto, batch 1, seq 4, 2 runs each" in out
    assert re.search(r"style +median +[\d.]+ ms", out) and "x1.000 of base" in out


def test_bench_device_cuda_without_cuda_fails_in_one_line(deploy, capsys):
    assert main(["bench", "--device", "cuda", str(deploy / "model.onnx")]) == 1
    assert _stderr_line(capsys).startswith("onnx-peft bench: error: --device cuda ")


# -- serve: the factory, and the CLI handing its flags to it --------------------------------------
def test_serve_factory_on_cpu_matches_the_reference(deploy):
    from onnx_peft.serve import open_deployment

    deployment = open_deployment(deploy, device="cpu", provider_options=None, tf32=True, strategy="slots")
    try:
        session = deployment.session
        assert (session.provider, session.device) == (CPU, "cpu")
        assert deployment.mixes_rows and deployment.adapter_paths.keys() == {"style"}
        ids = np.array(IDS * 2, np.int64)
        (out,) = session.run(None, {"input_ids": ids}, adapter=["style", None])
        assert np.abs(out[0] - _reference(adapter=True)[0]).max() < 1e-5
        assert np.abs(out[1] - _reference(adapter=False)[0]).max() < 1e-5
    finally:
        deployment.close()


def test_serve_factory_with_merge_keeps_one_adapter_per_run(deploy):
    from onnx_peft.serve import open_deployment

    deployment = open_deployment(deploy, device="cpu", strategy="merge")
    try:
        assert not deployment.mixes_rows and deployment.session.device == "cpu"
        (out,) = deployment.session.run(None, {"input_ids": np.array(IDS, np.int64)}, adapter="style")
        assert np.abs(out - _reference(adapter=True)).max() < 1e-5
    finally:
        deployment.close()


@pytest.mark.parametrize("kwargs, says", [
    ({"device": "cuda"}, "device 'cuda' asked for"),
    ({"provider_options": {"cpu": {"foo": 1}}}, "rejected provider option 'foo'"),
])
def test_serve_factory_refuses_what_this_machine_cannot_do(deploy, kwargs, says):
    from onnx_peft.serve import open_deployment

    with pytest.raises(RuntimeSessionError, match=says):
        open_deployment(deploy, **kwargs)


def test_serve_command_hands_its_session_flags_to_the_factory(deploy, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from onnx_peft.serve import deploy as deploy_module

    opened = []
    real = deploy_module.open_deployment

    def recording(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(deploy_module, "open_deployment", recording)
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: None)  # the app is built; no socket
    assert main(["serve", "--strategy", "merge", str(deploy), "--device", "cpu", "--quiet"]) == 0
    (deployment,) = opened
    assert deployment.session.device == "cpu" and not deployment.mixes_rows


def test_serve_command_device_cuda_without_cuda_fails_in_one_line(deploy, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    assert main(["serve", str(deploy), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("onnx-peft serve: error: --device cuda ") and "Traceback" not in err
