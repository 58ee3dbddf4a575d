"""Tiny seeded models and helpers shared by the tuner / checkpoint / interop tests.

Every builder returns a fresh model in eval mode with fixed weights (same seed, same
numbers), so two libraries can each wrap their own copy of the same base model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

VOCAB = 64

# Tiny matmuls gain nothing from threads, and with pytest-xdist workers sharing two cores
# torch's spinning thread pool makes a 2-layer forward ~100x slower.
torch.set_num_threads(1)


def tiny_llama() -> nn.Module:
    """LlamaForCausalLM, hidden 32, 2 layers; modules q/k/v/o_proj, gate/up/down_proj, lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    """GPT2LMHeadModel, hidden 32, 2 layers; c_attn/c_proj/c_fc are transformers Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls() -> nn.Module:
    """BertForSequenceClassification (3 labels), hidden 32, 2 layers; head is ``classifier``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


class TinyCNN(nn.Module):
    """x: [batch, 3, 8, 8] -> [batch, 4]; conv1/conv2 (Conv2d), conv1d (Conv1d), emb, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))        # [b, 8, 3, 3]
        h = self.conv1d(h.flatten(2))        # [b, 6, 9]
        return self.fc(h.mean(-1))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def token_ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def image_batch() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Forward pass returning one tensor (logits for HF models)."""
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter tensor (LoRA A/B, DoRA magnitude, saved modules) seeded random values.

    Fresh LoRA has B = 0 (a no-op), which would hide most bugs. Names are visited in sorted
    order so two models with the same module tree get the same numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    markers = ("lora_", "modules_to_save")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if any(m in name for m in markers):
                noise = torch.randn(param.shape, generator=generator) * scale
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + noise.abs() * 0.5)
                else:
                    param.add_(noise)


def copy_adapter_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy every adapter parameter of ``src`` into ``dst`` by name (both have PEFT's tree)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, param in src.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                dst_params[name].copy_(param)


def saved_keys(directory: Path) -> dict[str, tuple[int, ...]]:
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(Path(directory) / "adapter_model.safetensors")).items()}


BaseBuilder = Callable[[], nn.Module]
