"""Tiny seeded models and helpers shared by the tuner / checkpoint / interop tests.

Every builder returns a fresh model in eval mode with fixed weights (same seed, same
numbers), so two libraries can each wrap their own copy of the same base model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
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


def tiny_gpt2_with_biases() -> nn.Module:
    """tiny_gpt2 with seeded non-zero biases (GPT-2 starts them at zero, which would hide how a
    method treats the bias, e.g. IA3's output scaling)."""
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


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

TOL = 1e-5  # fp32 logits of two libraries (or of merged and unmerged layers) agree to this


# -- shared setup of the method tests (tests/test_method_*.py) ---------------------------------
def perturb_trainable(model: nn.Module, seed: int = 0, scale: float = 0.3, *,
                      select: tuple[str, ...] | None = None, around: float | None = None) -> None:
    """Seeded noise on a PeftModel's adapter tensors (a fresh adapter is mostly a no-op, which
    would hide bugs). Parameters are visited by sorted name, so two libraries with the same
    module tree get the same numbers.

    ``select``: substrings of the names to touch (default: every trainable parameter).
    ``around``: None adds ``noise * scale``; a number sets the tensor to ``around + scale * noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad if select is None else any(s in name for s in select):
                noise = torch.randn(param.shape, generator=generator)
                if around is None:
                    param.add_(noise * scale)
                else:
                    param.copy_(around + scale * noise)


def peft_and_ours(build: BaseBuilder, peft_config, our_config, seed: int = 0, *, strict: bool = True,
                  **perturbation):
    """(PEFT's, ours): one config on two fresh ``build()`` models, holding the same adapter.

    PEFT's is perturbed (:func:`perturb_trainable` with ``perturbation``); ours takes its
    values by name: with ``strict`` the whole state dict (the two module trees must match
    exactly), otherwise every trainable tensor.
    """
    import peft

    import onnx_peft

    theirs = peft.get_peft_model(build(), peft_config)
    perturb_trainable(theirs, seed, **perturbation)
    ours = onnx_peft.get_peft_model(build(), our_config)
    if strict:
        ours.load_state_dict(theirs.state_dict())
    else:
        params = dict(ours.named_parameters())
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                if param.requires_grad:
                    params[name].copy_(param)
    return theirs, ours


def assert_round_trip(saved: nn.Module, directory: Path, load: Callable, build: BaseBuilder,
                      inputs: torch.Tensor, *, changes_by: float | None = None,
                      same_keys_as: Path | None = None) -> nn.Module:
    """Save ``saved`` (one library's PeftModel) in ``directory``, load it onto a fresh ``build()``
    with ``load`` (the other library's ``PeftModel.from_pretrained``) and assert that both give
    the same logits on ``inputs`` (<= TOL). Returns the loaded model.

    ``changes_by``: assert too that the loaded adapter moves the base model's logits by more.
    ``same_keys_as``: a directory holding the other library's save of the same config; assert
    that both files hold the same tensor names and shapes.
    """
    saved.save_pretrained(directory)
    loaded = load(build(), directory)
    assert max_diff(run(loaded, inputs), run(saved, inputs)) <= TOL
    if changes_by is not None:
        assert max_diff(run(loaded, inputs), run(build(), inputs)) > changes_by
    if same_keys_as is not None:
        assert saved_keys(directory) == saved_keys(same_keys_as)
    return loaded


def assert_merge_verbs(model: nn.Module, inputs: torch.Tensor, layer_type: type, *,
                       restores_state_to: float | None = None) -> None:
    """``merge_adapter``, ``unmerge_adapter`` and ``merge_and_unload`` (in that order) each keep
    the unmerged logits (<= TOL), and the plain model has no ``layer_type`` left.

    ``restores_state_to``: assert too that unmerging gives the state dict back to that tolerance.
    """
    unmerged = run(model, inputs)
    state = snapshot(model)

    model.merge_adapter()
    merged = run(model, inputs)
    model.unmerge_adapter()
    restored = run(model, inputs)
    restored_state = model.state_dict()
    plain = model.merge_and_unload()

    assert max_diff(merged, unmerged) <= TOL
    assert max_diff(restored, unmerged) <= TOL
    assert max_diff(run(plain, inputs), unmerged) <= TOL
    assert not any(isinstance(m, layer_type) for m in plain.modules())
    if restores_state_to is not None:
        assert max(max_diff(v, restored_state[k]) for k, v in state.items()) <= restores_state_to


def adapter_arrays(layer: nn.Module, names, adapter: str = "default") -> dict[str, np.ndarray]:
    """``{name: array}`` of ``adapter``'s tensors among the layer's containers ``names``."""
    return {name: getattr(layer, name)[adapter].detach().numpy() for name in names
            if adapter in getattr(layer, name)}


def train_steps(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer,
                steps: int) -> list[float]:
    """``steps`` optimizer steps on the causal-LM loss of ``ids``; the losses, in order."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict, for :func:`changed_since`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_since(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the state-dict entries that differ from ``before`` (parameters and buffers)."""
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def assert_training_changes_only(build: Callable[[], nn.Module], trained: tuple[str, ...],
                                 lr: float = 3e-2) -> set[str]:
    """8 AdamW steps on ``build()`` (torch seeded first) over a [4, 8] batch: the loss drops and
    exactly the state-dict entries whose names contain one of ``trained`` change; returns them."""
    torch.manual_seed(0)
    model = build().train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    losses = train_steps(model, token_ids(batch=4, seq=8), optimizer, steps=8)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 1e-3
    assert changed == {k for k in before if any(t in k for t in trained)}
    return changed


def assert_numpy_merge_equals_torch(model: nn.Module, folder: Path, layer_type: type, tol: float) -> None:
    """The method's numpy ``merged_weight`` on the checkpoint saved in ``folder`` equals the
    weight ``model`` (holding that adapter) has after its own ``merge_adapter``, per layer."""
    from onnx_peft.convert import PeftAdapter

    adapter = PeftAdapter.read("a", folder)
    layers = {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, layer_type)}
    base = {k: m.base_layer.weight.detach().clone() for k, m in layers.items()}

    model.merge_adapter()

    assert sorted(adapter.modules) == sorted(layers)
    for module, layer in layers.items():
        flip = layer.fan_in_fan_out
        weight = (base[module].T if flip else base[module]).numpy()
        merged, _ = adapter.merged_weight(module, weight, None)
        torch_merged = layer.base_layer.weight.detach()
        assert np.abs(merged - (torch_merged.T if flip else torch_merged).numpy()).max() <= tol, module
