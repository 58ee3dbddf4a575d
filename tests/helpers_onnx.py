"""Tiny PEFT-wrapped models exported to ONNX, shared by the graph-pass tests.

Each fixture kind is exported once per process (cached) into a temp folder. A case holds the
ONNX path, the ONNX feeds and PyTorch reference outputs: with the adapter, with the adapter
disabled (the base) and after ``merge_and_unload`` (the merged model).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import peft
import torch
from torch import nn

TOL = 1e-5


@dataclass
class Case:
    kind: str
    path: Path
    feeds: dict[str, np.ndarray]
    adapted: np.ndarray      # PeftModel forward
    base: np.ndarray         # adapter disabled
    merged: np.ndarray       # merge_and_unload forward
    adapter_dir: Path        # the adapter saved in PEFT format
    base_module: nn.Module   # the PyTorch base model, wrapped like the exported one
    args: tuple

    @functools.cached_property
    def base_path(self) -> Path:
        """The base model (no adapter) exported the same way, in a folder of its own."""
        folder = _CACHE / f"{self.kind}_base"
        with _locked(self.kind + "_base"):
            if not (folder / "base.onnx").exists():
                folder.mkdir(parents=True, exist_ok=True)
                _export(self.base_module, self.args, folder / "base.onnx", self.kind, next(iter(self.feeds)))
        return folder / "base.onnx"


# Exports are slow (dynamo: seconds each), so they are cached on disk and shared by pytest-xdist
# workers; the key covers this file and the library versions, a lock serialises the first export.
_KEY = hashlib.sha256((Path(__file__).read_text() + torch.__version__ + peft.__version__ + ort.__version__
                       ).encode()).hexdigest()[:12]
_CACHE = Path(tempfile.gettempdir()) / f"onnx_peft_test_exports_{_KEY}"


@contextlib.contextmanager
def _locked(name: str):
    _CACHE.mkdir(parents=True, exist_ok=True)
    with open(_CACHE / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Logits(nn.Module):
    """Make HF models return one tensor, without a cache, so both exporters take them."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.m = model
        self.field = field

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.field == "logits" else {}
        return getattr(self.m(input_ids=ids, **kwargs), self.field)


class Stack(nn.Module):
    """Linear(16->32)+ReLU, Linear(32->32, no bias)+ReLU, Linear(32->8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _build(kind: str) -> tuple[nn.Module, peft.LoraConfig, str]:
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if kind.startswith("llama"):
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False)
        return (LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                init_lora_weights=False), "logits")
    if kind.startswith("gpt2"):
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
        return (GPT2LMHeadModel(cfg), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                fan_in_fan_out=True, init_lora_weights=False), "logits")
    if kind.startswith("bert"):
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=32)
        return (BertModel(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                init_lora_weights=False, use_dora=True), "last_hidden_state")
    return Stack(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"],
                                    init_lora_weights=False), ""


def _export(module: nn.Module, args: tuple, path: Path, kind: str, input_name: str) -> None:
    dynamo = "_dyn" in kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, optimize="noopt" not in kind,
                              input_names=[input_name], output_names=["out"], verbose=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=[input_name],
                              output_names=["out"])


@functools.cache
def case(kind: str) -> Case:
    """Kinds: llama_dyn, llama_dyn_noopt, gpt2_dyn, bert_dora_ts, bert_dora_dyn, stack_ts, stack2d_ts."""
    torch.manual_seed(0)
    base_model, config, field = _build(kind)
    base_model.eval()
    folder = _CACHE / kind
    pm = peft.get_peft_model(copy.deepcopy(base_model), config).eval()
    if field:
        ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
        wrap, base_wrap, input_name, args = _Logits(pm, field), _Logits(base_model, field), "input_ids", (ids,)
    else:
        shape = (3, 16) if kind == "stack2d_ts" else (2, 3, 16)
        args = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)
        wrap, base_wrap, input_name = pm, base_model, "x"
    path = folder / "model.onnx"
    with _locked(kind):
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _export(wrap.eval(), args, path, kind, input_name)
            pm.save_pretrained(_CACHE / f"{kind}_adapter")
    with torch.no_grad():
        adapted = wrap(*args).numpy()
        with pm.disable_adapter():
            base = wrap(*args).numpy()
        merged_model = copy.deepcopy(pm).merge_and_unload()
        merged = (_Logits(merged_model, field) if field else merged_model)(*args).numpy()
    return Case(kind, path, {input_name: args[0].numpy()}, adapted, base, merged, _CACHE / f"{kind}_adapter",
                base_wrap.eval(), args)


def run_onnx(path: str | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (to prove inputs are untouched)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file()}
