"""passes/merge_adapters.py: fold branches (or a PEFT dir) into base weights; ORT == PyTorch."""

import onnx
import pytest
from helpers_onnx import TOL, case, file_hashes, max_diff, run_onnx

from onnx_peft.cli import main
from onnx_peft.errors import IncompatibleAdapterError, NoAdapterSitesError, UnsafePathError
from onnx_peft.graph.io import load_model
from onnx_peft.graph.sites import find_adapter_branches
from onnx_peft.passes import MergeAdapters, merge_adapters


def _node_count(path):
    return len(onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("kind", ["llama_dyn", "llama_dyn_noopt", "gpt2_dyn", "stack_ts", "stack2d_ts",
                                  "bert_dora_ts", "bert_dora_dyn"])
def test_merged_graph_matches_pytorch_merge(kind, tmp_path):
    c = case(kind)
    before = file_hashes(c.path.parent)
    model = load_model(c.path)
    n_branches = len(find_adapter_branches(model))
    nodes_before = len(model.graph)
    merge = MergeAdapters()
    result = merge(model)
    assert result.modified and len(merge.merged) == n_branches
    assert find_adapter_branches(model) == {}
    assert len(model.graph) < nodes_before
    out = merge_adapters(c.path, tmp_path / "merged.onnx")
    onnx.checker.check_model(str(out))
    assert max_diff(run_onnx(out, c.feeds), c.merged) <= TOL
    assert file_hashes(c.path.parent) == before


def test_merged_has_the_base_graph_node_count(tmp_path):
    c = case("llama_dyn")
    out = merge_adapters(c.path, tmp_path / "merged.onnx")
    assert _node_count(out) == _node_count(c.base_path)
    model = onnx.load(str(out), load_external_data=False)
    used = {i for n in model.graph.node for i in n.input}
    assert all(init.name in used for init in model.graph.initializer)  # no dangling initializers


def test_merge_peft_dir_into_base_model(tmp_path):
    c = case("llama_dyn")
    base = load_model(c.base_path)
    merge = MergeAdapters(adapter_dir=c.adapter_dir)
    assert merge(base).modified and len(merge.merged) == 6
    out = merge_adapters(c.base_path, tmp_path / "m.onnx", adapter_dir=c.adapter_dir)
    assert max_diff(run_onnx(out, c.feeds), c.merged) <= TOL


def test_unmapped_adapter_targets_are_named(tmp_path):
    c = case("stack_ts")
    with pytest.raises(IncompatibleAdapterError, match="model.layers.0.self_attn.q_proj"):
        merge_adapters(c.base_path, tmp_path / "m.onnx", adapter_dir=case("llama_dyn").adapter_dir)


def test_nothing_to_merge(tmp_path):
    c = case("stack_ts")
    with pytest.raises(NoAdapterSitesError):
        merge_adapters(c.base_path, tmp_path / "m.onnx")
    result = MergeAdapters(strict=False)(load_model(c.base_path))
    assert not result.modified


def test_output_equal_to_input_is_refused():
    c = case("stack_ts")
    with pytest.raises(UnsafePathError):
        merge_adapters(c.path, c.path)


def test_cli_merge(tmp_path):
    c = case("stack_ts")
    assert main(["--quiet", "merge", str(c.path), "-o", str(tmp_path / "m.onnx")]) == 0
    assert max_diff(run_onnx(tmp_path / "m.onnx", c.feeds), c.merged) <= TOL
    assert main(["--quiet", "merge", str(c.base_path), "-o", str(tmp_path / "n.onnx")]) == 1
    assert main(["--quiet", "merge", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx")]) == 1
