"""Every shipped recipe runs on a tiny model and gives the PyTorch outputs; bad recipes fail early."""

import json
from pathlib import Path

import pytest
from helpers_onnx import TOL, case, file_hashes, max_diff, run_onnx

from onnx_peft.cli import main
from onnx_peft.errors import RecipeError
from onnx_peft.formats import load_adapter_file
from onnx_peft.recipes import RECIPES_DIR, run_recipe

SHIPPED = sorted(p.name for p in RECIPES_DIR.glob("*.json"))


def test_every_issue_recipe_is_shipped():
    for name in ["lora-train-extract.json", "merge.json", "extract-inputs.json", "extract-external.json",
                 "multi-adapter.json", "insert.json"]:
        assert name in SHIPPED
    top_level = Path(__file__).resolve().parents[1] / "passes"
    assert sorted(p.name for p in top_level.glob("*.json")) == SHIPPED


def test_merge_recipe_matches_pytorch_merged_model(tmp_path):
    c = case("llama_dyn")
    before = file_hashes(c.path.parent)
    state = run_recipe(RECIPES_DIR / "merge.json", model=c.path, output_dir=tmp_path)
    assert max_diff(run_onnx(state.onnx_model, c.feeds), c.merged) <= TOL
    assert file_hashes(c.path.parent) == before


def test_extract_inputs_recipe_swaps_adapter_in(tmp_path):
    c = case("llama_dyn")
    state = run_recipe("extract-inputs.json", model=c.path, output_dir=tmp_path)
    tensors, _ = load_adapter_file(state.adapter_files["extracted"])
    assert max_diff(run_onnx(state.onnx_model, c.feeds), c.base) <= TOL
    assert max_diff(run_onnx(state.onnx_model, {**c.feeds, **tensors}), c.adapted) <= TOL


def test_extract_external_recipe_keeps_adapter_out_of_model_data(tmp_path):
    c = case("llama_dyn")
    state = run_recipe("extract-external.json", model=c.path, output_dir=tmp_path)
    side = Path(str(state.onnx_model) + ".adapter.data")
    assert side.exists()
    assert max_diff(run_onnx(state.onnx_model, c.feeds), c.adapted) <= TOL


def test_multi_adapter_recipe_runs_per_row(tmp_path):
    from onnx_peft.runtime import AdapterSession

    c = case("llama_dyn")
    state = run_recipe("multi-adapter.json", model=c.path, output_dir=tmp_path)
    session = AdapterSession(state.onnx_model)
    session.load_adapter("a", state.adapter_files["extracted"])
    # this cached export has a fixed batch of 1; mixed batches are covered in test_multi_adapter
    assert max_diff(session.run(None, c.feeds, adapter=["a"])[0], c.adapted) <= TOL
    assert max_diff(session.run(None, c.feeds, adapter=[None])[0], c.base) <= TOL
    from onnx_peft.inspect import inspect_path

    assert inspect_path(state.onnx_model)["multi_adapter"]["ids_input"] == "adapter_ids"


def test_insert_recipe_with_cli_adapter_equals_insert_adapters(tmp_path):
    from test_insert_adapters import build_case, build_inserted, run_logits

    c = build_case("llama")
    name, adapter_dir = next(iter(c.adapters.items()))
    code = main(["run", "passes/insert.json", "--model", str(c.base_onnx), "--adapter", f"{name}={adapter_dir}",
                 "-o", str(tmp_path)])
    assert code == 0
    direct = build_inserted("llama")
    ours = run_logits(tmp_path / "model.onnx", c.input_ids, adapter_file=tmp_path / "adapters" / f"{name}.onnx_adapter")
    want = run_logits(direct / "model.onnx", c.input_ids, adapter_file=direct / "adapters" / f"{name}.onnx_adapter")
    assert max_diff(ours, want) <= TOL
    assert max_diff(run_logits(tmp_path / "model.onnx", c.input_ids), c.base_logits) <= TOL


def test_lora_train_extract_recipe_end_to_end(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=2)).save_pretrained(model_dir)
    _write_tokenizer(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in [("good film", "pos"), ("bad film", "neg")] * 8))
    recipe = json.loads((RECIPES_DIR / "lora-train-extract.json").read_text())
    recipe["passes"][0]["training_args"] = {"max_steps": 2, "per_device_train_batch_size": 4, "seed": 0}
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    state = run_recipe(recipe_path, model=model_dir, data=data, output_dir=tmp_path / "out")
    assert (state.adapters["default"] / "adapter_model.safetensors").exists()
    assert state.onnx_model.exists() and state.adapter_files


def _write_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)


@pytest.mark.parametrize("passes, message", [
    ([{"type": "ExtractAdaptors"}], "unknown type 'ExtractAdaptors'; valid: LoRA"),
    ([{"type": "ExtractAdapters", "make_input": True}], "unknown option 'make_input'; valid: make_inputs"),
    ([], "no passes"),
])
def test_bad_recipe_is_refused_before_any_work(tmp_path, passes, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        run_recipe({"input_model": "missing.onnx", "passes": passes}, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_recipe_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": [{"type": "Nope"}]}))
    assert main(["run", str(bad), "--model", "x.onnx"]) == 1
    err = capsys.readouterr().err
    assert "unknown type 'Nope'" in err and "Traceback" not in err


def test_qlora_recipe_trains_on_nf4_and_exports_the_same_codes(tmp_path):
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from onnx_peft import PeftModel, quantize_model
    from onnx_peft.runtime import AdapterSession

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, num_labels=2)).save_pretrained(model_dir)
    _write_tokenizer(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in [("good film", "pos"), ("bad film", "neg")] * 8))
    recipe = json.loads((RECIPES_DIR / "qlora-train-extract.json").read_text())
    recipe["passes"][0]["training_args"] = {"max_steps": 3, "per_device_train_batch_size": 4, "seed": 0}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    state = run_recipe(tmp_path / "recipe.json", model=model_dir, data=data, output_dir=tmp_path / "out")
    adapter = state.adapters["default"]
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"

    base = BertForSequenceClassification.from_pretrained(model_dir)
    base = quantize_model(base, "nf4", double_quant=True, skip_modules=("classifier",))
    torch_model = PeftModel.from_pretrained(base, adapter).eval()
    ids = np.array([[2, 5, 7, 3], [2, 6, 7, 3]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        expected = torch_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    session = AdapterSession(state.onnx_model)
    session.load_adapter("default", state.adapter_files["default"])
    assert np.abs(session.run(["logits"], feeds, adapter="default")[0] - expected).max() <= 1e-4


def test_quantize_base_step_keeps_extracted_slots_float(tmp_path):
    import onnx

    c = case("llama_dyn")
    recipe = {"input_model": {"type": "ONNXModel", "model_path": str(c.path)},
              "passes": [{"type": "ExtractAdapters"}, {"type": "QuantizeBase", "quant_type": "int4", "block_size": 16}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    state = run_recipe(tmp_path / "recipe.json", model=c.path, output_dir=tmp_path / "out")
    proto = onnx.load(state.onnx_model, load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) > 0
    slots = [i for i in proto.graph.input if i.name.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert slots and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in slots)
    tensors, _ = load_adapter_file(state.adapter_files["extracted"])
    quantized_base = run_onnx(state.onnx_model, c.feeds)
    with_adapter = run_onnx(state.onnx_model, {**c.feeds, **tensors})
    # int4 moves the base a little; the adapter still moves it as in float
    assert max_diff(with_adapter - quantized_base, c.adapted - c.base) < 0.1 * max(1e-6, abs(c.adapted - c.base).max())
