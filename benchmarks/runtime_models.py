"""The models benchmarks/runtime.py runs: Llama shapes, the HF base and its adapters, the ONNX
exports (cached), and the feeds they take.

Shapes (``--shape``), all Llama, LoRA r=16 (alpha 32) on all 7 projections, N_ADAPTERS random
adapters (non-zero A and B, seeded):

    bench  hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000   (~117M, the CPU model)
    gpu    hidden 2048, 6 layers, intermediate 5632, 16 heads, vocab 4096    (~327M)
    1b     hidden 2048, 22 layers, intermediate 5632, 32 heads (4 kv heads, GQA), vocab 32000
           (TinyLlama-1.1B's shape)

``--dtype fp16`` exports with ``export(dtype="fp16")`` (the HF model is loaded in fp32 and halved
by the exporter; the HF base is saved in fp16 to halve its disk, adapters stay fp32 and are cast
to the fp16 slots when converted). Each shape+dtype has its own cache folder (see runtime.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import log

RANK, ALPHA, N_ADAPTERS = 16, 32, 16
TASKS = {"": "causal-lm", "past_": "causal-lm-with-past"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def params(self) -> int:
        """Parameter count: embeddings + untied head + per layer attention, MLP and 2 norms."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * layer + self.hidden

    def describe(self, dtype: str) -> str:
        kv = "" if self.kv_heads == self.heads else f" ({self.kv_heads} kv heads)"
        return (f"Llama-shaped {dtype} model (hidden {self.hidden}, {self.layers} layers, intermediate "
                f"{self.intermediate}, {self.heads} heads{kv}, vocab {self.vocab}, ~{self.params / 1e6:.0f}M params)")


SHAPES = {
    "bench": Shape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=16, vocab=32000),
    "gpu": Shape(hidden=2048, intermediate=5632, layers=6, heads=16, kv_heads=16, vocab=4096),
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
}

# The models each question runs (prepare exports only these).
NEEDS = {
    "single": ("base", "slots", "merged"),
    "multi": ("base", "slots", "multi"),
    "generate": ("past_base", "past_slots", "past_merged"),
}


def adapter_name(i: int) -> str:
    return f"a{i:02d}"


def build_hf(cache: Path, shape: str = "bench", dtype: str = "fp32") -> tuple[Path, dict[str, Path]]:
    """The base transformers folder and N_ADAPTERS PEFT adapter dirs (random non-zero A, B).

    Seeded: the bench shape in fp32 is the same model as before shapes existed (other benchmarks
    build it through here)."""
    base_dir, adapter_root = cache / "hf_base", cache / "hf_adapters"
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    adapters = {n: adapter_root / n for n in names}
    if (base_dir / "config.json").is_file() and all(
        (p / "adapter_config.json").is_file() for p in adapters.values()
    ):
        return base_dir, adapters
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnx_peft import LoraConfig, get_peft_model

    s = SHAPES[shape]
    log(f"building the {shape} Llama-shaped model ({s.params / 1e6:.0f}M params) and {N_ADAPTERS} adapters")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    if dtype == "fp16":  # saved halved (the exporter halves it anyway), adapters made in fp32
        model.half().save_pretrained(base_dir, safe_serialization=True)
        model.float()
    else:
        model.save_pretrained(base_dir, safe_serialization=True)
    peft = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for key, param in peft.named_parameters():
                if "lora_A" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
                elif "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft.save_pretrained(adapters[name])
    return base_dir, adapters


def prepare(cache: Path, shape: str, dtype: str, questions: list[str]) -> dict[str, Path]:
    """The models ``questions`` run, exported once (each step skipped when its file exists)."""
    cache.mkdir(parents=True, exist_ok=True)
    base_dir, adapters = build_hf(cache, shape, dtype)
    from onnx_peft.export import export

    wanted = {key for q in questions for key in NEEDS[q]}
    paths: dict[str, Path] = {"hf_base": base_dir, "hf_a00": adapters["a00"]}  # HF PEFT's side of the rows
    for prefix, task in TASKS.items():
        jobs = {
            f"{prefix}base": dict(mode="in-graph"),
            f"{prefix}slots": dict(
                mode="inputs",
                adapters=adapters if not prefix else {n: adapters[n] for n in ("a00", "a01")},
            ),
            f"{prefix}merged": dict(mode="merged", adapters={"a00": adapters["a00"]}),
        }
        for key, kwargs in jobs.items():
            if key not in wanted:
                continue
            target = cache / key / "model.onnx"
            if not target.is_file():
                log(f"exporting {key} ({task}, {kwargs['mode']}, {dtype})")
                started = time.perf_counter()
                export(base_dir, cache / key, task=task, dtype=dtype, quiet=True, overwrite=True, **kwargs)
                log(f"  done in {time.perf_counter() - started:.0f} s")
            paths[key] = target
    if "multi" in wanted:
        target = cache / "multi" / "model.onnx"
        if not target.is_file():
            from onnx_peft.passes.multi_adapter import multi_adapter

            log("MultiAdapter pass on slots/")
            started = time.perf_counter()
            multi_adapter(paths["slots"], cache / "multi")
            log(f"  done in {time.perf_counter() - started:.0f} s")
        paths["multi"] = target
    return paths


def adapter_files(paths: dict[str, Path], key: str) -> dict[str, Path]:
    folder = paths[key].parent / "adapters"
    return {p.name.split(".")[0]: p for p in sorted(folder.glob("*.onnx_adapter"))}


def llm_feeds(batch: int, seq: int, seed: int = 0, vocab: int = 32000) -> dict[str, np.ndarray]:
    """input_ids [batch, seq] (random tokens below ``vocab``) and an all-ones attention_mask."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
    }


def decode_feeds(sess, past: int) -> dict[str, np.ndarray]:
    """One decode step of a causal-lm-with-past model: 1 new token after ``past`` cached ones;
    past_key_values.* [1, kv_heads, past, head_dim] random, in the model's float dtype."""
    rng = np.random.default_rng(3)
    feeds = {
        "input_ids": np.array([[7]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
    }
    for name, spec in sess._inputs.items():
        if name.startswith("past_key_values."):
            shape = (1, spec.shape[1], past, spec.shape[3])
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype or np.float32)
    return feeds
