"""The CLI as a newcomer meets it: flags anywhere, --version, help on every flag, every failure one
line (exit 1, usage 2) in the flags the user types, no torch -> the pip line, shipped recipes by
name, and output folders that are refused when not empty and replaced whole with --overwrite."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_onnx import TOL, case, max_diff, run_onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_peft import __version__
from onnx_peft.cli import build_parser, main, split_global_flags
from onnx_peft.cli.messages import cli_terms


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _reshape_model(path: Path) -> Path:
    """input_ids [1, s] -> Reshape to [3]: runs for 3 tokens, fails inside ONNX Runtime otherwise."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])
    node = helper.make_node("Reshape", ["input_ids", "shape"], ["y"])
    graph = helper.make_graph([node], "g", [ids], [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
                              initializer=[numpy_helper.from_array(np.array([3], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# -- flags, version, help ------------------------------------------------------------------------
def test_global_flags_are_taken_from_anywhere_before_a_double_dash():
    rest, flags = split_global_flags(["export", "m", "--quiet", "-o", "x", "--debug", "--", "--quiet"])
    assert rest == ["export", "m", "-o", "x", "--", "--quiet"]
    assert flags == {"--quiet", "--debug"}


def test_quiet_and_debug_work_after_the_command_and_its_arguments(tmp_path, capsys):
    model = _reshape_model(tmp_path / "m.onnx")
    assert main(["infer", str(model), "--input-ids", "1,2,3", "--quiet"]) == 0
    assert main(["--quiet", "infer", str(model), "--input-ids", "1 2 3"]) == 0
    assert capsys.readouterr().out.count("y [3]: [1 2 3]") == 2
    with pytest.raises(Exception, match="Reshape"):  # --debug at the end: the real traceback
        main(["infer", str(model), "--input-ids", "1,2", "--debug"])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnx-peft {__version__}"


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.items()
               for a in sub._actions if not a.help]
    assert missing == []
    assert len(commands) >= 11


# -- every failure: one line, exit 1 (usage: 2) ----------------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    return tmp_path


@pytest.mark.parametrize("argv, says", [
    (["export", "{d}/nodir", "-o", "{d}/out"], "no such model folder"),
    (["merge", "{d}/missing.onnx", "-o", "{d}/o.onnx"], "no such ONNX model file"),
    (["merge", "{d}/bad.onnx", "-o", "{d}/o.onnx"], "not a readable ONNX model"),
    (["extract", "{d}/bad.onnx", "-o", "{d}/out"], "not a readable ONNX model"),
    (["insert", "{d}/missing.onnx", "--adapter", "{d}/a", "-o", "{d}/out"], "no such ONNX model file"),
    (["convert-adapters", "--adapter", "{d}/nodir", "-o", "{d}/x.onnx_adapter"], "nodir"),
    (["inspect", "{d}/bad.onnx"], "not a readable ONNX model"),
    (["run", "{d}/bad.json"], "not valid JSON"),
    (["run", "{d}/missing.json"], "shipped recipes: extract-external"),
    (["multi-adapter", "{d}/missing.onnx", "-o", "{d}/out"], "no such ONNX model file"),
    (["infer", "{d}/missing.onnx", "--input-ids", "1,2"], "no such model file"),
    (["bench", "{d}/missing.onnx"], "no such model file"),
    (["train", "{d}/nodir", "--data", "{d}/x.jsonl", "-o", "{d}/out", "--config", "{d}/bad.json"],
     "not valid JSON"),
])
def test_wrong_input_is_one_line_and_exit_1(bad_files, capsys, argv, says):
    assert main([a.format(d=bad_files) for a in argv]) == 1
    line = _stderr_line(capsys)
    assert line.startswith(f"onnx-peft {argv[0]}: error: ") and says in line


@pytest.mark.parametrize("argv", [
    ["export", "m", "-o", "out", "--mode", "bogus"],
    ["infer", "m.onnx", "--input-ids", "1", "--top-k", "x"],
    ["merge", "m.onnx"],
    ["no-such-command"],
    [],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_onnx_runtime_failure_is_printed_once(tmp_path):
    """ORT logs its own copy of an error before raising it; the user sees only our line."""
    model = _reshape_model(tmp_path / "m.onnx")
    result = subprocess.run([sys.executable, "-m", "onnx_peft.cli", "infer", str(model), "--input-ids", "1,2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnx-peft infer: error: ONNX Runtime failed"), result.stderr


# -- the user's terms ----------------------------------------------------------------------------
@pytest.mark.parametrize("python, cli, command", [
    ("use mode='inputs' or 'external' to serve", "use --mode inputs or --mode external to serve", "export"),
    ("with mode='inputs' or 'merged'", "with --mode inputs or --mode merged", "export"),
    ("merge the PEFT adapter dir with adapter_dir=... (`--adapter DIR`) instead",
     "merge the PEFT adapter dir with --adapter DIR instead", "merge"),
    ("(loaded: none); call load_adapter first", "(loaded: none); load it with --adapter NAME=FILE", "infer"),
    ("pass task='causal-lm' or 'feature-extraction'", "pass --task causal-lm or --task feature-extraction", "export"),
    ("needs adapter branches to extract; pass a PeftModel or adapters={name: dir}",
     "needs adapter branches to extract; give --adapter NAME=DIR", "export"),
    ("the adapter with --adapter (adapters={'name': dir} in Python)", "the adapter with --adapter", "export"),
    ("or pass allow_pickle=True if you trust the file", "or pass --allow-pickle if you trust the file", "insert"),
    ("mode='in-graph' bakes in exactly one adapter; use mode='slots' for several",
     "--in-graph bakes in exactly one adapter; leave out --in-graph for several", "insert"),
])
def test_library_messages_are_shown_in_cli_terms(python, cli, command):
    assert cli_terms(python, command) == cli


def test_unknown_adapter_names_the_flag(tmp_path, capsys):
    model = _reshape_model(tmp_path / "m.onnx")
    assert main(["infer", str(model), "--input-ids", "1,2,3", "--use", "zz"]) == 1
    assert _stderr_line(capsys).endswith("load it with --adapter NAME=FILE")


def test_insert_in_graph_with_two_adapters_names_the_flag(tmp_path, capsys):
    c = case("stack_ts")
    argv = ["insert", str(c.base_path), "--adapter", f"a={c.adapter_dir}", "--adapter", f"b={c.adapter_dir}",
            "-o", str(tmp_path / "out"), "--in-graph"]
    assert main(argv) == 1
    assert "leave out --in-graph for several" in _stderr_line(capsys)


# -- without torch ---------------------------------------------------------------------------------
def _without_torch(code: str) -> subprocess.CompletedProcess:
    block = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("call", [
    "from onnx_peft.cli import main; sys.exit(main(['run', 'lora-train-extract', '--model', {m!r}, '-o', {o!r}]))",
    "from onnx_peft.cli import main; sys.exit(main(['export', {m!r}, '-o', {o!r}]))",
    "from onnx_peft.demo import main; sys.exit(main(['--output-dir', {o!r}]))",
])
def test_torch_commands_without_torch_say_pip_install(tmp_path, call):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = _without_torch(call.format(m=str(model), o=str(tmp_path / "out")))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install onnx-peft[torch]" in lines[0], result.stderr


# -- shipped recipes by name -------------------------------------------------------------------------
def test_shipped_recipe_runs_by_name_and_merges_the_given_adapter(tmp_path, capsys, monkeypatch):
    c = case("stack_ts")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "merge", "--model", str(c.path), "-o", "by_name"]) == 0
    assert max_diff(run_onnx(tmp_path / "by_name" / "model.onnx", c.feeds), c.merged) <= TOL
    # merge.json on the base model with --adapter: the adapter is merged, not ignored
    assert main(["run", "merge.json", "--model", str(c.base_path), "--adapter", str(c.adapter_dir),
                 "-o", "with_adapter"]) == 0
    assert max_diff(run_onnx(tmp_path / "with_adapter" / "model.onnx", c.feeds), c.merged) <= TOL
    assert not (Path(__file__).parents[1] / "onnx_peft" / "recipes" / "merged").exists()


# -- output folders --------------------------------------------------------------------------------
def _stale(folder: Path) -> Path:
    (folder / "adapters").mkdir(parents=True)
    stale = folder / "adapters" / "old.onnx_adapter"
    stale.write_bytes(b"from an earlier run")
    return stale


@pytest.mark.parametrize("command", ["extract", "insert", "multi-adapter", "merge", "run"])
def test_non_empty_output_folder_needs_overwrite_then_is_replaced_whole(tmp_path, capsys, command):
    c = case("stack_ts")
    out = tmp_path / "out"
    stale = _stale(out)
    slots = tmp_path / "slots"
    if command == "multi-adapter":
        assert main(["extract", str(c.path), "-o", str(slots)]) == 0
    argv = {"extract": ["extract", str(c.path)],
            "insert": ["insert", str(c.base_path), "--adapter", f"a={c.adapter_dir}"],
            "multi-adapter": ["multi-adapter", str(slots / "model.onnx")],
            "merge": ["merge", str(c.path)],
            "run": ["run", "merge", "--model", str(c.path)]}[command] + ["-o", str(out)]
    capsys.readouterr()
    assert main(argv) == 1
    assert "is not empty; choose a new folder, or pass --overwrite" in _stderr_line(capsys)
    assert stale.exists() and not (out / "model.onnx").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "model.onnx").exists() and not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_output_folder_holding_an_input_is_refused(tmp_path, capsys):
    c = case("stack_ts")
    out = tmp_path / "out"
    assert main(["extract", str(c.path), "-o", str(out)]) == 0
    assert main(["extract", str(out / "model.onnx"), "-o", str(out), "--overwrite"]) == 1
    assert "holds the input" in _stderr_line(capsys)
    assert (out / "model.onnx").exists()


def test_export_refuses_reuse_then_replaces_whole_and_is_quiet(tmp_path, capfd, monkeypatch):
    """--quiet (and quiet=True) hide transformers' load report and bars as well as ours."""
    import torch
    from tiny_models import tiny_bert_cls

    from onnx_peft import LoraConfig, get_peft_model
    from onnx_peft.export import export

    monkeypatch.delenv("ONNX_PEFT_QUIET", raising=False)  # the suite's default would hide a failure

    torch.manual_seed(0)
    model = tiny_bert_cls()
    model.bert.save_pretrained(tmp_path / "encoder")  # a bare encoder: the head comes from the adapter
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                                            task_type="SEQ_CLS"))
    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "deploy"
    stale = _stale(out)
    argv = ["export", str(tmp_path / "encoder"), "--adapter", f"a={tmp_path / 'adapter'}", "--task",
            "sequence-classification", "--mode", "inputs", "-o", str(out), "--quiet"]
    capfd.readouterr()
    assert main(argv) == 1
    assert "--overwrite" in capfd.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["a.onnx_adapter"]
    assert not stale.exists()
    monkeypatch.delenv("ONNX_PEFT_QUIET", raising=False)  # main() set it for its process
    export(tmp_path / "encoder", out, adapters={"b": tmp_path / "adapter"}, task="sequence-classification",
           mode="inputs", quiet=True, overwrite=True)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["b.onnx_adapter"]


def test_license_file_matches_pyproject():
    root = Path(__file__).resolve().parents[1]
    assert 'license = { text = "Apache-2.0" }' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
