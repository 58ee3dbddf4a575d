"""Nothing lost, nothing half-written, nothing private, nothing read from outside (issue 13).

* No writer overwrites a file it reads: resolved paths, symlinks, hard links, ``.data`` names.
* A command's outputs appear together or not at all (disk full mid-way, a folder in the way,
  a rename failing); a killed run's temporaries are deleted by the next run.
* Outputs honour the umask (not mkstemp's 0600 / mkdtemp's 0700).
* Every tensor read (main graph, If/Loop bodies, model-local functions, Constant attributes)
  passes the external-data check: no ``..``, no symlink, no hard link.

The models are built by hand (a MatMul + LoRA branch, < 1 KB), so the file runs in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_peft import safe_write
from onnx_peft.checkpoint import save_adapter_dir, write_safetensors
from onnx_peft.cli import main
from onnx_peft.convert import convert_adapters
from onnx_peft.errors import ModelFileError, OnnxPeftError, OutputError, UnsafePathError
from onnx_peft.formats import load_adapter_file, save_adapter_file
from onnx_peft.graph.io import check_external_data, load_model, save_model
from onnx_peft.inspect import inspect_path
from onnx_peft.methods.lora import LoraConfig
from onnx_peft.passes.extract_adapters import extract_adapters
from onnx_peft.passes.merge_adapters import merge_adapters
from onnx_peft.runtime import AdapterSession

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)      # base weight, MatMul layout [in, out]
A_T = RNG.standard_normal((4, 2)).astype(np.float32)    # A^T [in, r]
B_T = RNG.standard_normal((2, 3)).astype(np.float32)    # B^T [r, out]


def lora_model(path: Path) -> Path:
    """y = x W + (x A^T) B^T, x [2, 4]; weights in ``<name>.data``."""
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["base"], name="/fc/MatMul"),
             helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["xa"], name="/fc/lora_A/MatMul"),
             helper.make_node("MatMul", ["xa", "onnx::MatMul_8"], ["xb"], name="/fc/lora_B/MatMul"),
             helper.make_node("Add", ["base", "xb"], ["y"], name="/fc/Add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(W, "fc.weight"), numpy_helper.from_array(A_T, "onnx::MatMul_7"),
         numpy_helper.from_array(B_T, "onnx::MatMul_8")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def peft_dir(folder: Path) -> Path:
    """A PEFT LoRA adapter for module ``fc`` (r=2, in 4, out 3)."""
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors",
                      {"base_model.model.fc.lora_A.weight": A_T.T.copy(),
                       "base_model.model.fc.lora_B.weight": B_T.T.copy()})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc"]}))
    return folder


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, hidden ones included (so leftovers show too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture()
def slot_model(tmp_path) -> Path:
    """An extracted model with slots ``fc.lora_A.weight [4, r]``, ``fc.lora_B.weight [r, 3]``."""
    model, _ = extract_adapters(lora_model(tmp_path / "src" / "m.onnx"), tmp_path / "deploy")
    return model


# -- 1. no writer overwrites its inputs ----------------------------------------------------
def test_convert_refuses_to_write_over_the_peft_adapter_it_reads(tmp_path, capsys):
    adapter = peft_dir(tmp_path / "adapter")
    before = hashes(adapter)

    code = main(["convert-adapters", "--adapter", str(adapter), "-o", str(adapter / "adapter_model.safetensors")])

    assert code == 1
    assert "overwrite" in capsys.readouterr().err
    assert hashes(adapter) == before
    with pytest.raises(UnsafePathError, match="adapter_config.json"):
        convert_adapters(adapter, output_path=adapter / "adapter_config.json", format="npz")
    assert hashes(adapter) == before


def test_convert_refuses_symlinks_and_hard_links_to_its_inputs(tmp_path):
    adapter = peft_dir(tmp_path / "adapter")
    slot_file = convert_adapters(adapter, output_path=tmp_path / "slots.safetensors")
    (tmp_path / "link.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    os.link(slot_file, tmp_path / "hard.safetensors")
    before = hashes(tmp_path)

    for output in ("link.safetensors", "hard.safetensors"):
        with pytest.raises(UnsafePathError, match="overwrite the input"):
            convert_adapters(adapter if output == "link.safetensors" else slot_file,
                             output_path=tmp_path / output)
    with pytest.raises(UnsafePathError, match="overwrite the input"):  # a slot file onto itself
        convert_adapters(slot_file, output_path=slot_file)

    assert hashes(tmp_path) == before


def test_convert_refuses_to_write_over_the_model_or_its_data(slot_model, tmp_path):
    adapter = peft_dir(tmp_path / "adapter")
    before = hashes(slot_model.parent)

    for output in (slot_model, slot_model.with_name("m.onnx.data")):
        with pytest.raises(UnsafePathError, match="overwrite the input"):
            convert_adapters(adapter, slot_model, output_path=output, format="onnx_adapter")

    assert hashes(slot_model.parent) == before


def test_convert_may_rewrite_its_own_earlier_output_inside_the_adapter_dir(tmp_path):
    """Only the files it reads are protected: a second run replaces the first run's output."""
    adapter = peft_dir(tmp_path / "adapter")
    first = convert_adapters(adapter, output_path=adapter / "slots.npz")
    again = convert_adapters(adapter, output_path=adapter / "slots.npz")

    assert first == again
    np.testing.assert_array_equal(load_adapter_file(again)[0]["fc.lora_A.weight"], A_T)


def test_save_model_refuses_a_hard_link_of_its_weights_as_output(tmp_path):
    path = lora_model(tmp_path / "m.onnx")
    model = load_model(path)
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "m.onnx.data", tmp_path / "other" / "copy.onnx.data")
    before = hashes(tmp_path)

    with pytest.raises(UnsafePathError, match="overwrite the input"):
        save_model(model, tmp_path / "other" / "copy.onnx")

    assert hashes(tmp_path) == before


# -- 2. all outputs or none ----------------------------------------------------------------
def _disk_full_after(monkeypatch, limit: int) -> None:
    """Every file written through ``os.fdopen`` (our atomic writers) gets ENOSPC after ``limit`` bytes."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            room = max(limit - self.written, 0)
            self.handle.write(data[:room])
            self.written += min(room, len(data))
            if room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))


def test_extract_on_a_full_disk_leaves_no_output_and_no_temporaries(tmp_path, monkeypatch):
    source = lora_model(tmp_path / "src" / "m.onnx")
    before = hashes(tmp_path)
    _disk_full_after(monkeypatch, 16)  # the model files are written; the adapter file is not

    with pytest.raises(OnnxPeftError, match="No space left"):
        extract_adapters(source, tmp_path / "out", save_format="safetensors")

    assert not (tmp_path / "out").exists()
    assert hashes(tmp_path) == before and leftovers(tmp_path) == []


def test_convert_on_a_full_disk_is_an_output_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    adapter = peft_dir(tmp_path / "adapter")
    out = convert_adapters(adapter, output_path=tmp_path / "out" / "a.safetensors")
    before = hashes(tmp_path)
    _disk_full_after(monkeypatch, 16)

    with pytest.raises(OutputError, match="a.safetensors.*No space left"):
        convert_adapters(adapter, output_path=out)

    assert hashes(tmp_path) == before and leftovers(out.parent) == []


def test_merge_into_an_existing_folder_leaves_no_stray_data_file(tmp_path):
    source = lora_model(tmp_path / "src" / "m.onnx")
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "old.txt").write_text("keep")
    not_a_file = tmp_path / "dir.onnx"
    not_a_file.mkdir()

    with pytest.raises(UnsafePathError):
        merge_adapters(source, folder)
    with pytest.raises(UnsafePathError, match="is a folder"):
        merge_adapters(source, not_a_file, overwrite=True)
    assert not (tmp_path / "merged.data").exists() and not (tmp_path / "dir.onnx.data").exists()
    assert (folder / "old.txt").read_text() == "keep" and list(not_a_file.iterdir()) == []

    path = merge_adapters(source, folder, overwrite=True)
    assert path == folder / "model.onnx" and sorted(p.name for p in folder.iterdir()) == ["model.onnx",
                                                                                        "model.onnx.data"]
    assert not (tmp_path / "merged.data").exists() and leftovers(tmp_path) == []
    merged = load_model(path).graph.initializers["fc.weight"].const_value.numpy()
    np.testing.assert_allclose(merged, W + A_T @ B_T, atol=1e-6)


def test_a_failed_rename_puts_the_previous_model_and_data_back(tmp_path, monkeypatch):
    """model.onnx and model.onnx.data are installed as one step: the .data rename succeeds, the
    .onnx rename fails, and both old files come back."""
    source = load_model(lora_model(tmp_path / "src" / "m.onnx"))
    out = save_model(source, tmp_path / "out" / "m.onnx")
    before = hashes(out.parent)
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == out and not Path(src).name.startswith("old-"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    source.graph.initializers["fc.weight"].const_value = ir.tensor(W * 2, name="fc.weight")
    with pytest.raises(ModelFileError, match="I/O error"):
        save_model(source, out)

    assert hashes(out.parent) == before and leftovers(out.parent) == []


def test_a_peft_dir_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["fc"])
    folder = save_adapter_dir(tmp_path / "a", config, {"base_model.model.fc.lora_A.weight": A_T.T.copy()})
    before = hashes(folder)
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == "adapter_config.json" and not Path(src).name.startswith("old-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OutputError, match="No space left"):
        save_adapter_dir(folder, LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]),
                         {"base_model.model.fc.lora_A.weight": np.ones((4, 4), np.float32)})

    assert hashes(folder) == before and leftovers(folder) == []


_KILLED_SAVE = """
import os, signal, sys
import onnx_ir as ir
from onnx_peft.graph.io import load_model, save_model

model = load_model(sys.argv[1])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
model.graph.initializers["fc.weight"].const_value = ir.LazyTensor(
    die, dtype=ir.DataType.FLOAT, shape=ir.Shape([4, 3]))
save_model(model, sys.argv[2])
"""


def test_the_next_run_deletes_what_a_killed_run_left_behind(tmp_path):
    source = lora_model(tmp_path / "src" / "m.onnx")
    out = tmp_path / "out" / "merged.onnx"
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(source), str(out)], capture_output=True,
                         env={**os.environ, "ONNX_PEFT_QUIET": "1"}, timeout=120)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    stale = leftovers(out.parent)
    assert len(stale) == 1 and stale[0].startswith(".merged.onnx.onnx-peft-")
    live = out.parent / safe_write.temp_name("busy.onnx")  # this process's own: in use, kept
    live.mkdir()
    other = out.parent / ".notes.tmp"  # not ours: kept
    other.write_text("x")

    save_model(load_model(source), out)

    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [".notes.tmp", live.name, "merged.onnx", "merged.onnx.data"])


def test_stale_temporaries_of_live_processes_and_other_hosts_are_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = safe_write.temp_name("m.onnx")
    host, pid = name.split(".onnx-peft-")[1].split("-")[:2]
    stale = tmp_path / name.replace(f"-{pid}-", f"-{dead.pid}-")
    another = "000000" if host != "000000" else "111111"
    other_host = tmp_path / name.replace(f"-{host}-{pid}-", f"-{another}-{dead.pid}-")
    parent = tmp_path / name.replace(f"-{pid}-", f"-{os.getppid()}-")
    for path in (stale, other_host, parent):
        path.mkdir()

    removed = safe_write.clean_stale_temps(tmp_path)

    assert removed == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, parent.name])


def test_a_folder_command_deletes_a_killed_runs_staging_folder(tmp_path):
    """extract/insert/export stage their folder under the same naming (output_folder.staging_folder)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = safe_write.temp_name("deploy")
    killed = tmp_path / name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    (killed / "adapters").mkdir(parents=True)
    (killed / "model.onnx").write_bytes(b"half")

    extract_adapters(lora_model(tmp_path / "src" / "m.onnx"), tmp_path / "deploy")

    assert not killed.exists() and leftovers(tmp_path) == []


# -- 3. the umask --------------------------------------------------------------------------
@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    safe_write.process_umask.cache_clear()
    yield
    os.umask(old)
    safe_write.process_umask.cache_clear()


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*"))}


def test_outputs_honour_the_umask(tmp_path, umask_027):
    assert safe_write.process_umask() == 0o027
    out = tmp_path / "out"
    for suffix in (".onnx_adapter", ".safetensors", ".npz"):
        save_adapter_file(out / f"a{suffix}", {"fc.lora_A.weight": A_T})
    save_adapter_dir(out / "peft", LoraConfig(r=2, lora_alpha=2, target_modules=["fc"]),
                     {"base_model.model.fc.lora_A.weight": A_T.T.copy()})
    save_model(load_model(lora_model(tmp_path / "src" / "m.onnx")), out / "model.onnx")
    extract_adapters(tmp_path / "src" / "m.onnx", out / "deploy")

    modes = _modes(out)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {"peft": 0o750, "deploy": 0o750}
    assert sorted(modes) == sorted(["a.onnx_adapter", "a.safetensors", "a.npz", "peft", "model.onnx",
                                    "model.onnx.data", "peft/adapter_model.safetensors",
                                    "peft/adapter_config.json", "deploy", "deploy/m.onnx",
                                    "deploy/m.onnx.data", "deploy/m.onnx_adapter"])


# -- 4. every tensor read passes one check -------------------------------------------------
def _external(name: str, location: str, shape: tuple[int, ...] = (4,)) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(shape))))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _function_model(path: Path, location: str) -> Path:
    """main graph -> local function f, whose body holds ``Constant(value=<external at location>)``."""
    body = [helper.make_node("Constant", [], ["c"], value=_external("c", location)),
            helper.make_node("Add", ["x", "c"], ["y"])]
    function = helper.make_function("local", "f", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("f", ["X"], ["Y"], domain="local")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _subgraph_model(path: Path, location: str) -> Path:
    """If(cond) whose then-branch holds ``Constant(value=<external at location>)``."""
    then_graph = helper.make_graph([helper.make_node("Constant", [], ["t"], value=_external("t", location))],
                                   "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    else_graph = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.zeros(4, np.float32), "e"))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("build", [_function_model, _subgraph_model])
def test_external_data_escaping_from_a_function_or_subgraph_is_refused(tmp_path, build):
    (tmp_path / "secret").write_bytes(b"S" * 64)
    path = build(tmp_path / "a" / "b" / "m.onnx", "../../secret")
    before = hashes(tmp_path)

    for read in (load_model, inspect_path, check_external_data):
        with pytest.raises(UnsafePathError, match="outside the model's folder"):
            read(path)
    with pytest.raises(UnsafePathError, match="outside the model's folder"):
        merge_adapters(path, tmp_path / "merged.onnx")

    assert hashes(tmp_path) == before


def test_hard_links_and_symlinks_into_the_model_folder_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    hard = _function_model(tmp_path / "hard" / "m.onnx", "w.bin")
    os.link(secret, hard.parent / "w.bin")
    soft = _function_model(tmp_path / "soft" / "m.onnx", "w.bin")
    (soft.parent / "w.bin").symlink_to(secret)
    initializer = lora_model(tmp_path / "init" / "m.onnx")
    os.link(initializer.with_name("m.onnx.data"), tmp_path / "elsewhere.data")

    for read in (load_model, check_external_data, AdapterSession):  # ONNX Runtime alone reads hard links
        with pytest.raises(UnsafePathError, match="hard link"):
            read(hard)
        with pytest.raises(UnsafePathError, match="symlink"):
            read(soft)
        with pytest.raises(UnsafePathError, match="hard link"):
            read(initializer)


@pytest.mark.parametrize("external_data", [False, True])
def test_a_function_constant_travels_with_the_saved_model(tmp_path, monkeypatch, external_data):
    """Read from the model's folder (not the working directory), and written into the output:
    ``ir.save`` would keep its location, then pointing into the output's folder."""
    path = _function_model(tmp_path / "m" / "m.onnx", "c.bin")
    (path.parent / "c.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)

    model = load_model(path)
    saved = load_model(save_model(model, tmp_path / "copy" / "m.onnx", external_data=external_data))

    function = next(iter(saved.functions.values()))
    constant = next(node for node in function if node.op_type == "Constant")
    np.testing.assert_array_equal(constant.attributes["value"].value.numpy(), np.arange(4, dtype=np.float32))
