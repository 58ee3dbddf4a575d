"""inspect: slots, ranks, methods and contract of models, adapter files, PEFT and deploy dirs."""

from __future__ import annotations

import json

from test_insert_adapters import build_case, build_inserted

from onnx_peft.cli import main
from onnx_peft.inspect import inspect_path, render_text


def test_inspect_model_lists_slots_and_contract():
    info = inspect_path(build_inserted("llama") / "model.onnx")
    assert info["kind"] == "model" and info["has_contract"] and info["fingerprint"]
    assert info["inputs"] == ["input_ids"]
    assert info["modules"]["model.layers.0.self_attn.q_proj"]["method"] == "lora"
    assert len(info["slots"]) == 20
    assert "model.layers.1.mlp.down_proj [lora]" in render_text(info)


def test_inspect_adapter_file_and_peft_dir_give_ranks():
    deploy = build_inserted("llama")
    info = inspect_path(deploy / "adapters" / "patterned.onnx_adapter")
    assert info["format"] == "onnx_adapter" and info["fingerprint"].startswith("ort31:")
    assert info["modules"]["model.layers.0.self_attn.v_proj"]["rank"] == 2  # rank_pattern
    assert info["modules"]["model.layers.0.self_attn.q_proj"] == {"method": "lora", "forms": ["lora"], "rank": 4, "in": 64, "out": 64}

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
    assert "baked in on 4 modules" in capsys.readouterr().out


def test_cli_reports_errors_as_one_line(tmp_path, capsys):
    assert main(["convert-adapters", "--adapter", str(tmp_path), "-o", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-peft convert-adapters: error:") and "adapter_config.json" in err
    assert main(["inspect", str(tmp_path / "nothing.txt")]) == 1
