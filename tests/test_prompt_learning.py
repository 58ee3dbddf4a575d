"""Prompt-learning methods in PyTorch against Hugging Face PEFT: same outputs, same checkpoints,
same training, both ways (prompt tuning, prefix tuning with and without projection, p-tuning
MLP/LSTM, multitask prompt tuning; CAUSAL_LM on Llama, FEATURE_EXTRACTION on BERT)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TOL, saved_keys, tiny_llama

import onnx_peft
from onnx_peft.errors import AdapterConfigError, CheckpointError, OnnxPeftError

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
MASK = torch.ones_like(IDS)

CASES = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "prefix-projection": ("PrefixTuningConfig", dict(num_virtual_tokens=2, prefix_projection=True,
                                                     encoder_hidden_size=16)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=2, encoder_hidden_size=8,
                                                  encoder_reparameterization_type="LSTM")),
    "multitask": ("MultitaskPromptTuningConfig", dict(num_virtual_tokens=3, num_tasks=2, num_ranks=2)),
}


def _tasks(case: str) -> dict:
    return {"task_ids": torch.tensor([1, 0])} if case == "multitask" else {}


def _pair(case: str, seed: int = 0):
    """(PEFT's, ours) training-mode models holding the same perturbed prompt encoder."""
    name, kwargs = CASES[case]
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, name)(task_type="CAUSAL_LM", **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(theirs.named_parameters()):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    ours = onnx_peft.get_peft_model(tiny_llama(), getattr(onnx_peft, name)(task_type="CAUSAL_LM", **kwargs))
    prefix = "prompt_encoder.default."
    state = {k[len(prefix):]: v for k, v in theirs.state_dict().items() if k.startswith(prefix)}
    ours.prompt_encoder["default"].load_state_dict(state)
    return theirs.eval(), ours.eval()


def greedy(model, ids: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """Greedy decoding by full forwards: what a prompt adapter's generate must produce."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_wrapper_equals_peft(case):
    theirs, ours = _pair(case)
    kwargs = _tasks(case)
    expected = theirs(input_ids=IDS, attention_mask=MASK, **kwargs).logits
    got = ours(input_ids=IDS, attention_mask=MASK, **kwargs).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL
    # with labels: PEFT's loss (virtual positions get -100)
    loss_theirs = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS, **kwargs).loss
    loss_ours = ours(input_ids=IDS, attention_mask=MASK, labels=IDS, **kwargs).loss
    assert abs(loss_theirs.item() - loss_ours.item()) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_round_trip_both_ways(case, tmp_path):
    theirs, ours = _pair(case)
    kwargs = _tasks(case)
    expected = theirs(input_ids=IDS, attention_mask=MASK, **kwargs).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    loaded = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert (loaded(input_ids=IDS, attention_mask=MASK, **kwargs).logits - expected).abs().max() <= TOL
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert (back(input_ids=IDS, attention_mask=MASK, **kwargs).logits - expected).abs().max() <= TOL
    assert (expected[:, -5:] - tiny_llama()(input_ids=IDS).logits).abs().max() > 1e-3  # the adapter acts


@pytest.mark.parametrize("case", ["prompt", "prefix", "multitask"])
def test_generate_injects_the_prompt_once(case, tmp_path):
    """Greedy generate equals greedy decoding by full PEFT forwards (PEFT 0.21's own generate
    re-injects the prompt at every step under transformers 5, whose cache kwarg is ``cache``)."""
    theirs, ours = _pair(case)
    kwargs = _tasks(case)
    expected = greedy(theirs, IDS, 5, **kwargs)
    got = ours.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, **kwargs)
    assert torch.equal(got, expected)


def test_training_changes_only_the_prompt():
    _, ours = _pair("p-tuning-mlp")
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ours(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("prompt_encoder.default.") for k in changed)


def test_text_init_uses_the_tokenized_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "review", "as", "good", "or", "bad"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="classify the review", tokenizer_name_or_path=str(tmp_path / "tok"))
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**kwargs))
    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.PromptTuningConfig(**kwargs))
    table = ours.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
    words = tiny_llama().get_input_embeddings().weight
    assert torch.equal(table[3], words[1]) and torch.equal(table[4], words[2])  # "classify the" repeated


def test_feature_extraction_on_bert(tmp_path):
    from transformers import BertConfig, BertModel

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4)).eval()

    for name in ("PromptTuningConfig", "PrefixTuningConfig"):
        torch.manual_seed(1)
        theirs = peft.get_peft_model(bert(), getattr(peft, name)(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
        theirs.save_pretrained(tmp_path / name)
        ours = onnx_peft.PeftModel.from_pretrained(bert(), tmp_path / name)
        expected = theirs.eval()(input_ids=IDS, attention_mask=MASK).last_hidden_state
        assert (ours(input_ids=IDS, attention_mask=MASK).last_hidden_state - expected).abs().max() <= TOL


def test_bad_configs_and_checkpoints_name_the_field(tmp_path):
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens"):
        onnx_peft.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(AdapterConfigError, match="tokenizer_name_or_path"):
        onnx_peft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x")
    with pytest.raises(AdapterConfigError, match="encoder_reparameterization_type"):
        onnx_peft.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(AdapterConfigError, match="num_transformer_submodules"):
        onnx_peft.PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2)
    _, ours = _pair("multitask")
    with pytest.raises(AdapterConfigError, match="task_ids"):
        ours(input_ids=IDS, attention_mask=MASK)
    with pytest.raises(AdapterConfigError, match="no merged form"):
        ours.merge_and_unload()
    theirs, _ = _pair("prefix-projection")
    theirs.save_pretrained(tmp_path / "proj")
    with pytest.raises(CheckpointError, match="projected prefix"):
        onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "proj", is_trainable=True)
    theirs, _ = _pair("prompt")
    theirs.save_pretrained(tmp_path / "p")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(OnnxPeftError, match="token_dim=32 but the model's hidden size is 16"):
        onnx_peft.PeftModel.from_pretrained(other, tmp_path / "p")


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=3)).eval()


def test_sequence_classification_trains_the_head_as_peft(tmp_path):
    """SEQ_CLS: the classifier is trained in full next to the prompt (PEFT's modules_to_save),
    saved as ``base_model.classifier.*``; both ways, same logits; training moves both."""
    for name, kwargs in (("PromptTuningConfig", {}), ("PromptEncoderConfig", {"encoder_hidden_size": 16})):
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_bert_cls(), getattr(peft, name)(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                      **kwargs))
        with torch.no_grad():
            for _, param in sorted(theirs.named_parameters()):
                if param.requires_grad:
                    param.add_(0.3 * torch.randn_like(param))
        theirs.eval().save_pretrained(tmp_path / name)
        expected = theirs(input_ids=IDS, attention_mask=MASK).logits
        ours = onnx_peft.PeftModel.from_pretrained(_bert_cls(), tmp_path / name)
        assert (ours(input_ids=IDS, attention_mask=MASK).logits - expected).abs().max() <= TOL
        ours.save_pretrained(tmp_path / f"{name}-ours")
        assert saved_keys(tmp_path / f"{name}-ours") == saved_keys(tmp_path / name)
        back = peft.PeftModel.from_pretrained(_bert_cls(), tmp_path / f"{name}-ours")
        assert (back(input_ids=IDS, attention_mask=MASK).logits - expected).abs().max() <= TOL
    fresh = onnx_peft.get_peft_model(_bert_cls(), onnx_peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight",
                         "base_model.classifier.modules_to_save.default.weight",
                         "base_model.classifier.modules_to_save.default.bias"}
    with fresh.disable_adapter():
        base = fresh(input_ids=IDS, attention_mask=MASK).logits
    assert (base - _bert_cls()(input_ids=IDS, attention_mask=MASK).logits).abs().max() <= TOL
