"""Training: only adapters (and heads) learn, with a torch loop, gradient checkpointing and
``onnx_peft.training`` (transformers.Trainer); checkpoints resume; data errors are clear."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from onnx_peft import LoraConfig, PeftModel, get_peft_model
from onnx_peft.cli import main
from onnx_peft.data import build_label_map, load_text_data
from onnx_peft.errors import DataError, OnnxPeftError
from onnx_peft.training import enable_gradient_checkpointing, train

POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "film", "was", "is", "show", "really"]
WORDS = POSITIVE + NEGATIVE + FILLER

FAST = {"learning_rate": 3e-2, "per_device_train_batch_size": 16, "logging_steps": 1000}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and xdist workers then do not fight over cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Four-word texts; the label is carried by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2, bos_token_id=2))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", sentiment_rows(64, 0)), write_jsonl(folder / "eval.jsonl", sentiment_rows(32, 1))


def batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    enc = make_tokenizer()([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([int(r["label"] == "positive") for r in rows])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}


# -- plain torch loop ----------------------------------------------------------------------
def test_torch_loop_trains_only_adapters_and_head():
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save.default." in n for n in trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(**batch(sentiment_rows(8, step))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    changed = {n for n, before in trainable.items() if not torch.equal(params[n], before)}
    assert any(".lora_B." in n for n in changed) and any(".modules_to_save." in n for n in changed)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_lora_the_same_gradients(use_reentrant):
    ids = torch.randint(3, len(WORDS) + 3, (2, 6), generator=torch.Generator().manual_seed(0))

    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
        with torch.no_grad():  # non-zero B, so lora_A gets a gradient too
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
            base = model.get_base_model()  # transformers 5: is_activation_checkpointing; 4.x: is_gradient_checkpointing
            assert getattr(base, "is_activation_checkpointing", None) or getattr(base, "is_gradient_checkpointing", None)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert len(plain) == 8  # q_proj and v_proj A/B in 2 layers
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        assert grad.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_transformers_trainer_trains_a_peft_model_directly(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    start = adapter_tensors(model)
    ids = torch.randint(3, len(WORDS) + 3, (16, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             dataloader_pin_memory=False)
    Trainer(model=model, args=args, train_dataset=rows).train()
    end = adapter_tensors(model)
    assert any(not torch.equal(start[k], end[k]) for k in start if ".lora_B." in k)


# -- onnx_peft.training -----------------------------------------------------------------------
def test_train_classification_learns_and_writes_a_peft_adapter(bert_dir, sentiment, tmp_path):
    train_file, eval_file = sentiment
    result = train(bert_dir, train_file, tmp_path / "adapter", eval_data=eval_file, quiet=True,
                   config={"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
                   training_args={**FAST, "max_steps": 40})

    assert result.labels == ["negative", "positive"]
    assert result.global_step == 40
    assert result.metrics["eval_accuracy_after"] >= 0.9 > result.metrics["eval_accuracy_before"]
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    out = result.adapter_dir
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "labels.json"}
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]

    # The adapter alone (on a fresh base) reproduces the accuracy.
    loaded = PeftModel.from_pretrained(tiny_bert(), out).eval()
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    inputs = batch(rows)
    with torch.no_grad():
        predicted = loaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.argmax(-1)
    accuracy = (predicted == inputs["labels"]).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["eval_accuracy_after"])


def test_train_causal_lm_on_text_lines_with_checkpointing_lowers_eval_loss(llama_dir, tmp_path):
    lines = [" ".join(random.Random(i).sample(FILLER, 4)) for i in range(32)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines[:8]) + "\n")
    result = train(llama_dir, tmp_path / "train.txt", tmp_path / "adapter", task="causal-lm",
                   eval_data=tmp_path / "eval.txt", quiet=True,
                   training_args={**FAST, "max_steps": 10, "gradient_checkpointing": True})
    assert result.labels is None
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert result.metrics["eval_perplexity_after"] < result.metrics["eval_perplexity_before"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert "lm_head" not in config["target_modules"]


def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(bert_dir, sentiment, tmp_path):
    from safetensors.numpy import load_file

    train_file, _ = sentiment
    args = {**FAST, "max_steps": 6, "save_steps": 3}
    full = train(bert_dir, train_file, tmp_path / "full", quiet=True, training_args=args)
    assert (tmp_path / "full" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "full" / "checkpoint-3" / "optimizer.pt").is_file()

    resumed = train(bert_dir, train_file, tmp_path / "resumed", quiet=True, training_args=args,
                    resume_from_checkpoint=tmp_path / "full" / "checkpoint-3")
    assert resumed.global_step == full.global_step == 6
    expected = load_file(tmp_path / "full" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    halfway = load_file(tmp_path / "full" / "checkpoint-3" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert abs(got[key] - expected[key]).max() < 1e-6, key
    assert any(abs(halfway[k] - expected[k]).max() > 1e-4 for k in expected)


def test_train_continues_a_given_peft_model_with_integer_labels(tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in sentiment_rows(32, 3)]
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    start = adapter_tensors(model)
    result = train(model, rows, tmp_path / "adapter", tokenizer=make_tokenizer(), quiet=True,
                   training_args={**FAST, "max_steps": 2})
    assert result.labels == ["0", "1"]
    end = adapter_tensors(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_unknown_training_argument_suggests_the_right_name(bert_dir, sentiment, tmp_path):
    with pytest.raises(OnnxPeftError, match="'learning_rat'.*'learning_rate'"):
        train(bert_dir, sentiment[0], tmp_path / "out", training_args={"learning_rat": 1e-3}, quiet=True)


# -- data ----------------------------------------------------------------------------------
def test_data_reads_jsonl_csv_and_txt_alike(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good film", "label": 1}\n\n{"text": "bad film", "label": 0}\n')
    (tmp_path / "a.csv").write_text("label,text\n1,good film\n0,bad film\n")
    (tmp_path / "a.txt").write_text("good film\n\nbad film\n")
    jsonl = load_text_data(tmp_path / "a.jsonl", "sequence-classification")
    csv = load_text_data(tmp_path / "a.csv", "sequence-classification")
    txt = load_text_data(tmp_path / "a.txt", "causal-lm")
    assert jsonl.texts == csv.texts == txt.texts == ["good film", "bad film"]
    assert build_label_map(jsonl).ids(jsonl.labels) == build_label_map(csv).ids(csv.labels) == [1, 0]


@pytest.mark.parametrize("content, suffix, task, message", [
    (None, ".jsonl", "sequence-classification", r"missing\.jsonl: data file not found"),
    ("", ".jsonl", "sequence-classification", "has no records"),
    ('{"text": "hi", "sentiment": "pos"}\n', ".jsonl", "sequence-classification",
     r"record 1: field 'label' is missing from the record; fields present: text, sentiment"),
    ('{"text": "hi", "label": 1}\n{"text": "x"\n', ".jsonl", "sequence-classification", r":2: not valid JSON"),
    ("text,label\nhi,\n", ".csv", "sequence-classification", r":2: field 'label' is empty"),
    ("hello\n", ".txt", "sequence-classification", "holds texts only"),
    ("a,b\n", ".tsv", "causal-lm", "unsupported data format '.tsv'"),
])
def test_data_errors_name_the_file_and_field(tmp_path, content, suffix, task, message):
    path = tmp_path / f"missing{suffix}" if content is None else tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_text_data(path, task)


def test_eval_labels_must_occur_in_training_labels():
    train_rows = load_text_data([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], "sequence-classification")
    eval_rows = load_text_data([{"text": "c", "label": "neutral"}], "sequence-classification")
    with pytest.raises(DataError, match=r"labels \['neutral'\] do not occur"):
        build_label_map(train_rows, eval_rows)


# -- CLI -----------------------------------------------------------------------------------
def test_cli_trains_and_reports_one_line_errors(bert_dir, sentiment, tmp_path, capsys):
    train_file, eval_file = sentiment
    (tmp_path / "args.json").write_text(json.dumps({**FAST, "max_steps": 2}))
    (tmp_path / "lora.json").write_text(json.dumps({"r": 2, "target_modules": ["query"]}))
    code = main(["--quiet", "train", str(bert_dir), "--data", str(train_file), "--eval-data", str(eval_file),
                 "-o", str(tmp_path / "adapter"), "--training-args", str(tmp_path / "args.json"),
                 "--config", str(tmp_path / "lora.json")])
    assert code == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert "eval_accuracy_after=" in capsys.readouterr().out

    code = main(["train", str(bert_dir), "--data", str(train_file), "--label-field", "stars", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "field 'stars' is missing" in err and "fields present: text, label" in err

    assert main(["train", str(bert_dir), "--data", str(train_file)]) == 2  # -o missing


# -- every method through onnx_peft.train / `onnx-peft train` ------------------------------------
METHOD_CONFIGS = {
    "ia3": {"target_modules": ["query", "value", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
    "loha": {"r": 4, "target_modules": ["query", "value"]},
    "lokr": {"r": 4, "target_modules": ["query", "value"]},
    "oft": {"oft_block_size": 8, "target_modules": ["query", "value"]},
    "boft": {"boft_block_size": 4, "target_modules": ["query", "value"]},
    "hra": {"r": 4, "target_modules": ["query", "value"]},
    "vera": {"r": 4, "target_modules": ["query", "value"]},
    "adalora": {"init_r": 4, "target_r": 2, "total_step": 20, "target_modules": ["query", "value"]},
    "fourierft": {"n_frequency": 32, "target_modules": ["query", "value"]},
    "miss": {"r": 4, "target_modules": ["query", "value"]},
}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_cli_trains_every_method_and_the_adapter_reloads(method, bert_dir, sentiment, tmp_path, capsys):
    train_file, eval_file = sentiment
    (tmp_path / "args.json").write_text(json.dumps({**FAST, "max_steps": 40}))
    (tmp_path / "config.json").write_text(json.dumps(METHOD_CONFIGS[method]))
    code = main(["train", str(bert_dir), "--method", method.upper(), "--data", str(train_file), "--eval-data",
                 str(eval_file), "-o", str(tmp_path / "adapter"), "--training-args", str(tmp_path / "args.json"),
                 "--config", str(tmp_path / "config.json"), "--quiet"])  # global flag after the command
    assert code == 0, capsys.readouterr().err
    assert "eval_loss_after=" in capsys.readouterr().out
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper() and "classifier" in saved["modules_to_save"]
    # training reached the adapter: its tensors left their (method-specific) initial values
    fresh = get_peft_model(tiny_bert(), PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").peft_config["default"])
    initial = {k: v for k, v in fresh.adapter_state_dict("default").items() if "classifier" not in k}
    ours = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    trained = ours.adapter_state_dict("default")
    assert initial and all(trained[k].shape == v.shape for k, v in initial.items())
    assert max((trained[k] - v).abs().max().item() for k, v in initial.items()) > 1e-4
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    inputs = batch(sentiment_rows(4, 3))
    with torch.no_grad():
        a = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        b = theirs(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert (a - b).abs().max().item() <= 1e-5
