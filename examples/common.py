"""Shared setup for the examples: a tiny seeded BERT classifier and two LoRA adapters, built
offline in about a second, or the folders written by ``make demo`` (``--from-demo DIR``).

Not an example itself; the scripts import it (``python examples/NAME.py`` puts this folder on
``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ONNX_PEFT_QUIET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

WORDS = ["good", "great", "fine", "bad", "awful", "sad", "the", "a", "movie", "film", "was", "is", "really"]
TEXTS = ["the movie was good", "a really awful film", "the film is fine", "sad movie", "great"]


def example_parser(doc: str, from_demo: bool = False) -> argparse.ArgumentParser:
    """The options every example takes: --work-dir, and --from-demo where it can reuse `make demo`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work-dir", help="where to write (default: a temporary folder)")
    if from_demo:
        parser.add_argument("--from-demo", metavar="DIR", help="use the `make demo` output folder instead of a tiny model")
    return parser


def work_dir(arg: str | None) -> Path:
    """``--work-dir`` or a fresh temporary folder."""
    path = Path(arg) if arg else Path(tempfile.mkdtemp(prefix="onnx-peft-example-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_tokenizer():
    """A word-level tokenizer over WORDS (no download): [PAD]=0, [UNK]=1, [EOS]=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_bert_dir(path: Path, num_labels: int = 2) -> Path:
    """BertForSequenceClassification, hidden 32, 2 layers, seed 0, saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def random_lora_dir(base_dir: Path, path: Path, seed: int, r: int, head: bool = True) -> Path:
    """A LoRA with random A and B (so it changes the outputs) on every encoder Linear, PEFT format.

    ``pooler.dense`` is not targeted: a LoRA there exports as Gemm(Gemm(x, A), B) on 2-D input,
    which extract_adapters does not find yet (mode="inputs" fails; the `make demo` adapters,
    trained on "dense", include it). ``head``: train the classifier in full too (task_type
    SEQ_CLS puts it in modules_to_save), as ``onnx_peft.train`` and the demo do.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from onnx_peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value", "output.dense", "intermediate.dense"], task_type="SEQ_CLS" if head else None,
                        init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    return path


def base_and_adapters(work: Path, from_demo: str | None = None, head: bool = True) -> tuple[Path, dict[str, Path]]:
    """(base model folder, {name: PEFT adapter folder}): the ``make demo`` ones, or tiny ones."""
    if from_demo:
        from onnx_peft.demo import minilm_dir

        return minilm_dir(), {t: Path(from_demo) / "adapters_peft" / t for t in ("sentiment", "topic")}
    base = tiny_bert_dir(work / "tiny-bert")
    return base, {"a": random_lora_dir(base, work / "adapters" / "a", seed=1, r=4, head=head),
                  "b": random_lora_dir(base, work / "adapters" / "b", seed=2, r=8, head=head)}


def encode(base_dir: Path, texts: list[str] = TEXTS) -> dict[str, np.ndarray]:
    """Tokenized ``texts`` as int64 numpy feeds (input_ids, attention_mask, token_type_ids)."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(base_dir)(texts, padding=True, return_tensors="np")
    enc.setdefault("token_type_ids", np.zeros_like(enc["input_ids"]))  # the word-level tokenizer has none
    return {k: v.astype(np.int64) for k, v in enc.items()}


def peft_logits(base_dir: Path, adapter_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch reference: base model + PeftModel.from_pretrained(adapter), logits [batch, labels]."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from onnx_peft import PeftModel
    from onnx_peft.checkpoint import read_label_names

    names = read_label_names(adapter_dir)  # labels.json, written by onnx_peft.train: the head's size
    extra = {"num_labels": len(names)} if names else {}
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir, **extra),
                                      adapter_dir).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def only_inputs(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The feeds an ONNX model takes (an export may drop e.g. token_type_ids)."""
    return {k: v for k, v in feeds.items() if k in names}
