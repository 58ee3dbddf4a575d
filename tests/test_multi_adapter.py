"""MultiAdapter pass + AdapterSession per-row adapters: each row equals running it alone, on every
ONNX Runtime device (``ort_device``)."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_runtime import DIMS, MODULES, build_slot_model, make_adapter, reference

from onnx_peft.errors import IncompatibleAdapterError, RuntimeSessionError
from onnx_peft.graph.contract import CONTRACT_KEY
from onnx_peft.graph.io import load_model
from onnx_peft.passes.multi_adapter import MultiAdapterPass, multi_adapter
from onnx_peft.runtime import MULTI_ADAPTER_KEY, AdapterSession

RANKS = {"r4": 4, "r8": 8, "r16": 16, "r8_partial": 8, "r4b": 4}


def adapters() -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for i, (name, rank) in enumerate(RANKS.items()):
        out[name] = make_adapter(rank, 20 + i, modules=MODULES[:2] if "partial" in name else MODULES)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["seq", "no_seq"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    slot = build_slot_model(folder / "slot.onnx", seq=request.param)
    return slot, multi_adapter(slot, folder / "multi"), request.param


def test_pass_replaces_slots_by_banks_and_records_layout(models):
    slot, multi, _ = models
    before = load_model(slot)
    model = load_model(slot)
    result = MultiAdapterPass()(model)
    assert result.modified
    names = [v.name for v in result.model.graph.inputs]
    assert names[0] == "x" and names[-1] == "adapter_ids"
    assert not any(n.endswith(".weight") for n in names)
    assert sorted(n for n in names if n.endswith(".bank")) == sorted(
        f"{m}.lora_{k}.bank" for m in MODULES for k in "AB")
    assert result.model.metadata_props[CONTRACT_KEY] == before.metadata_props[CONTRACT_KEY]
    assert MULTI_ADAPTER_KEY in result.model.metadata_props
    onnx.checker.check_model(onnx.load(multi))


def test_plain_ort_runs_the_base_with_ids_zero(models, ort_providers):
    slot, multi, seq = models
    x = np.random.default_rng(1).standard_normal((4, 3, DIMS[0]) if seq else (4, DIMS[0])).astype(np.float32)
    sess = ort.InferenceSession(str(multi), providers=ort_providers)
    (out,) = sess.run(None, {"x": x, "adapter_ids": np.zeros(4, np.int64)})
    assert np.abs(out - reference(x)).max() <= 1e-5


def test_each_row_equals_running_it_alone(models, ort_device):
    slot, multi, seq = models
    tensors = adapters()
    single, mixed = AdapterSession(slot, device=ort_device), AdapterSession(multi, device=ort_device)
    assert mixed.is_multi_adapter and not single.is_multi_adapter
    for name, t in tensors.items():
        single.load_adapter(name, t)
        mixed.load_adapter(name, t)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 6, DIMS[0]) if seq else (16, DIMS[0])).astype(np.float32)
    rows = [None, "r4", "r8", "r16", "r8_partial", "r4b", None, "r16",
            "r4", "r4", None, "r8_partial", "r16", "r8", "r4b", None]
    (out,) = mixed.run(["logits"], {"x": x}, adapter=rows)
    for i, name in enumerate(rows):
        (alone,) = single.run(["logits"], {"x": x[i:i + 1]}, adapter=name)
        assert np.abs(out[i:i + 1] - alone).max() <= 1e-5, (i, name)
        assert np.abs(out[i] - reference(x[i:i + 1], tensors.get(name))[0]).max() <= 1e-5
    # one adapter for the whole batch, and the base
    assert np.abs(mixed.run(None, {"x": x}, adapter="r8")[0] - single.run(None, {"x": x}, adapter="r8")[0]).max() <= 1e-5
    assert np.abs(mixed.run(None, {"x": x})[0] - reference(x)).max() <= 1e-5
    # explicit ids (rows of AdapterSession.adapter_ids) give the same as names
    ids = mixed.adapter_ids
    explicit = np.array([0 if n is None else ids[n] for n in rows], np.int64)
    assert np.array_equal(mixed.run(None, {"x": x, "adapter_ids": explicit})[0], out)


def test_unload_and_reload_rebuild_banks_without_new_session(models, ort_device):
    slot, multi, seq = models
    tensors = adapters()
    session = AdapterSession(multi, device=ort_device)
    ort_session = session._session
    x = np.random.default_rng(2).standard_normal((3, 2, DIMS[0]) if seq else (3, DIMS[0])).astype(np.float32)
    session.load_adapter("r4", tensors["r4"])
    session.load_adapter("r16", tensors["r16"])
    session.unload_adapter("r4")
    session.load_adapter("r8", tensors["r8"])
    (out,) = session.run(None, {"x": x}, adapter=["r8", None, "r16"])
    for i, name in enumerate(["r8", None, "r16"]):
        assert np.abs(out[i] - reference(x[i:i + 1], tensors.get(name))[0]).max() <= 1e-5
    assert session._session is ort_session and session.adapters == ["r16", "r8"]


def test_bad_rows_raise_typed_errors(models, ort_device):
    slot, multi, seq = models
    session = AdapterSession(multi, device=ort_device)
    session.load_adapter("a", adapters()["r4"])
    x = np.zeros((2, 3, DIMS[0]) if seq else (2, DIMS[0]), np.float32)
    with pytest.raises(RuntimeSessionError, match="3 entries but the batch has 2"):
        session.run(None, {"x": x}, adapter=["a", None, "a"])
    with pytest.raises(RuntimeSessionError, match=r"'b'.*loaded: a"):
        session.run(None, {"x": x}, adapter=["a", "b"])
    with pytest.raises(RuntimeSessionError, match=r"adapter_ids\[1\] = 7 is out of range"):
        session.run(None, {"x": x, "adapter_ids": np.array([1, 7])})
    with pytest.raises(RuntimeSessionError, match="managed by the session"):
        session.run(None, {"x": x, "model.l0.lora_A.bank": np.zeros((1, 8, 0), np.float32)})
    with pytest.raises(IncompatibleAdapterError):
        session.load_adapter("bad", {"model.l0.lora_A.weight": np.zeros((8, 4), np.float32)})
    assert np.abs(session.run(None, {"x": x}, adapter=["a", None])[0][1] - reference(x[1:])[0]).max() <= 1e-5


def test_threads_mix_rows_while_adapters_come_and_go(models, ort_device):
    slot, multi, seq = models
    tensors = adapters()
    session = AdapterSession(multi, device=ort_device)
    for name in ["r4", "r8", "r16"]:
        session.load_adapter(name, tensors[name])
    x = np.random.default_rng(4).standard_normal((4, 2, DIMS[0]) if seq else (4, DIMS[0])).astype(np.float32)
    expected = {n: reference(x, tensors.get(n)) for n in [None, "r4", "r8", "r16", "r4b"]}
    errors: list[str] = []

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        for _ in range(30):
            rows = [[None, "r4", "r8", "r16", "r4b"][i] for i in rng.integers(0, 5, 4)]
            try:
                (out,) = session.run(None, {"x": x}, adapter=rows)
            except RuntimeSessionError:
                continue  # r4b comes and goes
            for i, name in enumerate(rows):
                if np.abs(out[i] - expected[name][i]).max() > 1e-5:
                    errors.append(f"row {i} ({name}) wrong")

    def churn() -> None:
        for _ in range(15):
            session.load_adapter("r4b", tensors["r4b"])
            session.unload_adapter("r4b")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_cli_multi_adapter_and_bench(models, tmp_path, capsys, ort_device):
    from onnx_peft.cli import main
    from onnx_peft.formats import save_adapter_file

    slot, _, _ = models
    assert main(["multi-adapter", str(slot), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    files = []
    for name in ["r4", "r16"]:
        files.append(f"{name}={save_adapter_file(tmp_path / f'{name}.onnx_adapter', adapters()[name])}")
    argv = ["bench", str(tmp_path / "out" / "model.onnx"), "--batch", "3", "--seq", "2", "--runs", "2", "--warmup", "1",
            "--device", ort_device]
    assert main(argv + [f"--adapter={f}" for f in files]) == 0
    out = capsys.readouterr().out
    assert "mixed rows" in out and "r16" in out and "x1.000 of base" in out
    assert main(["multi-adapter", str(tmp_path / "out" / "model.onnx"), "-o", str(tmp_path / "again")]) == 1
    assert main(["bench", str(slot), "--adapter", "broken"]) == 1
    assert "broken: no such adapter file" in capsys.readouterr().err  # --adapter takes [NAME=]PATH


def test_pass_refuses_a_model_without_slots(tmp_path):
    import onnx_ir as ir

    from onnx_peft.errors import NoAdapterSitesError

    model = ir.from_onnx_text("""
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }
    """)
    ir.save(model, tmp_path / "plain.onnx")
    with pytest.raises(NoAdapterSitesError, match="no adapter slots"):
        multi_adapter(tmp_path / "plain.onnx", tmp_path / "out")
