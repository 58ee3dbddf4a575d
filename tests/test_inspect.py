"""inspect: slots, ranks, methods and contract of models, adapter files, PEFT and deploy dirs."""

from __future__ import annotations

import json

import onnx_ir as ir
from helpers_onnx import case as onnx_case
from test_insert_adapters import build_case, build_inserted
from test_sites import LLAMA_TARGETS

from onnx_peft.cli import main
from onnx_peft.graph.branch import BRANCH_KEY
from onnx_peft.graph.io import load_model, save_model
from onnx_peft.inspect import inspect_path, render_text


def test_inspect_model_lists_slots_and_contract():
    info = inspect_path(build_inserted("llama") / "model.onnx")
    assert info["kind"] == "model" and info["has_contract"] and info["fingerprint"]
    assert info["inputs"] == ["input_ids"]
    assert info["modules"]["model.layers.0.self_attn.q_proj"]["method"] == "lora"
    assert len(info["slots"]) == 20
    down = info["modules"]["model.layers.1.mlp.down_proj"]
    assert (down["in"], down["out"]) == (128, 64) and down["rank"] == "lora_r.model.layers.1.mlp.down_proj"
    text = render_text(info)
    assert "20 adapter slots on 10 modules" in text
    assert "model.layers.1.mlp.down_proj [lora] any rank, 128 -> 64" in text  # symbolic rank: any fits
    assert info["baked_modules"] == {} and "baked" not in text


def test_inspect_adapter_file_and_peft_dir_give_ranks():
    deploy = build_inserted("llama")
    info = inspect_path(deploy / "adapters" / "patterned.onnx_adapter")
    assert info["format"] == "onnx_adapter" and info["fingerprint"].startswith("ort31:")
    assert info["modules"]["model.layers.0.self_attn.v_proj"]["rank"] == 2  # rank_pattern
    assert info["modules"]["model.layers.0.self_attn.q_proj"] == {"method": "lora", "forms": ["lora"], "rank": 4, "in": 64, "out": 64}
    assert "model.layers.0.self_attn.v_proj [lora] rank 2, 64 -> 32" in render_text(info)

    peft = inspect_path(build_case("llama").adapters["patterned"])
    assert peft["kind"] == "peft_adapter" and peft["use_rslora"]
    assert peft["modules"]["model.layers.0.mlp.down_proj"]["scale"] == 3 / 2  # alpha 3 / sqrt(4)
    assert "rank 2" in render_text(peft)


def test_inspect_deploy_dir_and_baked_model():
    info = inspect_path(build_inserted("gpt2"))
    assert info["kind"] == "deploy_dir" and set(info["adapters"]) == {"conv1d"}
    assert "adapter conv1d" in render_text(info)


def test_cli_insert_convert_inspect(tmp_path, capsys):
    case = build_case("llama")
    out = tmp_path / "deploy"
    assert main(["--quiet", "insert", str(case.base_onnx), "--adapter", f"p={case.adapters['patterned']}",
                 "--adapter", str(case.adapters["other"]), "-o", str(out)]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["other.onnx_adapter", "p.onnx_adapter"]
    assert main(["convert-adapters", "--adapter", str(case.adapters["other"]), "--model",
                 str(out / "model.onnx"), "-o", str(tmp_path / "o.safetensors")]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path / "o.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors" and len(info["modules"]) == 4
    baked = tmp_path / "baked"
    assert main(["insert", str(case.base_onnx), "--adapter", str(case.adapters["other"]), "-o", str(baked),
                 "--in-graph"]) == 0
    assert main(["inspect", str(baked / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "4 modules with baked LoRA (rank 3)" in out and "model.layers.0.self_attn.k_proj [lora] rank 3, 64 -> 32" in out


def test_cli_reports_errors_as_one_line(tmp_path, capsys):
    assert main(["convert-adapters", "--adapter", str(tmp_path), "-o", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-peft convert-adapters: error:") and "adapter_config.json" in err
    assert main(["inspect", str(tmp_path / "nothing.txt")]) == 1


def test_in_graph_export_shows_baked_lora_found_by_structure(tmp_path):
    """A PEFT model exported unmerged by torch.onnx, initializer names stripped as another tool
    might: the branches are still found, with rank and widths, and called baked, not "0 slots"."""
    model = load_model(onnx_case("llama_dyn").path)
    for i, value in enumerate(list(model.graph.initializers.values())):
        value.name = f"w{i}"
    save_model(model, tmp_path / "model.onnx")
    info = inspect_path(tmp_path / "model.onnx")
    assert not info["has_contract"] and info["slots"] == []
    assert set(info["baked_modules"]) == LLAMA_TARGETS
    assert info["baked_modules"]["model.layers.0.self_attn.v_proj"] == {
        "forms": ["lora"], "method": "lora", "rank": 4, "in": 32, "out": 16}
    text = render_text(info)
    assert "adapter baked into the graph: 6 modules with baked LoRA (rank 4)" in text
    assert "model.layers.1.mlp.down_proj [lora] rank 4, 64 -> 32" in text
    assert "`onnx-peft extract` turns it into slots" in text and "slots on" not in text


def test_baked_dora_and_plain_base():
    info = inspect_path(onnx_case("bert_dora_dyn").path)
    assert len(info["baked_modules"]) == 10
    assert {e["method"] for e in info["baked_modules"].values()} == {"lora+dora"}
    assert "10 modules with baked DoRA (rank 4)" in render_text(info)
    base = inspect_path(onnx_case("llama_dyn").base_path)
    assert base["baked_modules"] == {} and base["slots"] == []
    assert "no adapter found: a base model, or one with its adapter merged" in render_text(base)


def test_branch_tags_mark_a_baked_form_without_telling_names(tmp_path):
    """A form grafted by `insert --in-graph` whose weights carry no slot name (tagged nodes only)."""
    model = ir.from_onnx_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {0,0,0,0,0,0,0,0,0,0,0,0}, float[3] s = {1,2,3}> {
        h = MatMul(x, w)
        y = Mul(h, s)
    }""")
    model.graph.node(1).metadata_props[BRANCH_KEY] = "fc"
    save_model(model, tmp_path / "model.onnx")
    info = inspect_path(tmp_path / "model.onnx")
    assert info["baked_modules"] == {"fc": {"forms": [], "method": "adapter"}}
    assert "1 module with a baked adapter branch (method not recognised)" in render_text(info)
