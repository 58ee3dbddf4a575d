"""The fuzzer's seed files, built once per test session from ``tiny_models.tiny_llama``.

    peft/            PEFT LoRA adapter (r=4, q_proj + v_proj, seeded non-zero weights)
    base/model.onnx  the plain base model (insert / merge-from-dir input)
    slots/model.onnx slot model (insert_adapters); slots/adapters/a.onnx_adapter
    ingraph/model.onnx  LoRA branches in the graph (insert_adapters in-graph: extract / merge input)
    multi/model.onnx the slot model with per-row banks (multi-adapter pass)
    files/a.{safetensors,npz,onnx_adapter}  the adapter as slot files (convert-adapters)

Building needs torch and takes ~15 s (one torch export); the cases themselves need neither torch nor this module.
Under pytest-xdist the workers share one build through a file lock.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

READY = "corpus.json"


def build(root: Path) -> dict[str, str]:
    """Write the corpus under ``root`` and return {item: path}."""
    import torch
    from tiny_models import tiny_llama

    from onnx_peft import LoraConfig, export, get_peft_model
    from onnx_peft.convert import convert_adapters
    from onnx_peft.passes.insert_adapters import insert_adapters
    from onnx_peft.passes.multi_adapter import multi_adapter

    root.mkdir(parents=True, exist_ok=True)
    tiny_llama().save_pretrained(root / "hf_base")
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(root / "peft")
    base = export(root / "hf_base", root / "base", task="causal-lm", quiet=True)
    # one torch export; the adapter models come from the ONNX passes (seconds faster per session)
    slots = insert_adapters(base, {"a": root / "peft"}, root / "slots")
    ingraph = insert_adapters(base, {"a": root / "peft"}, root / "ingraph", mode="in-graph")
    multi = multi_adapter(slots, root / "multi")
    files = root / "files"
    files.mkdir()
    for suffix in ("safetensors", "npz"):
        convert_adapters(root / "peft", slots, output_path=files / f"a.{suffix}")
    shutil.copy(slots.parent / "adapters" / "a.onnx_adapter", files / "a.onnx_adapter")
    shutil.rmtree(root / "hf_base")
    items = {"peft": root / "peft", "base": base, "slots": slots, "ingraph": ingraph, "multi": multi,
             "safetensors": files / "a.safetensors", "npz": files / "a.npz",
             "onnx_adapter": files / "a.onnx_adapter"}
    items = {k: str(v) for k, v in items.items()}
    (root / READY).write_text(json.dumps(items))
    return items


def shared(root: Path) -> dict[str, str]:
    """The corpus under ``root``, built by whichever process gets the lock first."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        ready = root / READY
        if ready.is_file():
            return json.loads(ready.read_text())
        for child in root.iterdir():  # a build that died half-way
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return build(root)
