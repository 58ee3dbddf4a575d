"""What do adapters cost at inference time in ONNX Runtime (CPU)?

Llama-shaped fp32 model (hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000, ~117M
parameters), LoRA r=16 (alpha 32) on all 7 projections, 16 PEFT adapter dirs with random
non-zero A and B. Exported once and cached in /tmp/onnx_peft_bench_rt (``--cache``):

    base/          plain export, no slots                    (task causal-lm)
    slots/         mode="inputs": optional slot inputs + adapters/*.onnx_adapter
    merged/        mode="merged" with adapter a00
    multi/         slots/ through the MultiAdapter pass (banks + adapter_ids)
    past_*/        the same three for task causal-lm-with-past (generation)

Questions, each answered by ratios from ONE interleaved run (variants in a random order per
round, median of ``--runs`` runs each), so drift of the shared machine hits all alike:

1. batch 1, seq 128: base / slots, no adapter / slots, one adapter / merged / slots, switching
   between two adapters every run / a new InferenceSession per adapter switch.
2. batch 16 (seq 32 by default, ``--multi-seq``): base / slot model with one adapter /
   MultiAdapter with one shared adapter / with 16 distinct adapters / with none.
3. greedy generation, prompt 16, 32 new tokens: base / adapter on the slot model / merged.

Wall-clock ratios on a shared 2-core box move by several percent, so the ORT profiler gives the
stable figure: per variant, kernel time summed per node over profiled runs, and the share of
kernels that belong to adapter branches (nodes that exist only because of the slots or banks).

    python benchmarks/runtime.py            # ~10-15 min on 2 cores (exports the first time)
    python benchmarks/runtime.py --quick    # fewer runs, no BENCHMARKS.md update
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Runtime (benchmarks/runtime.py)"
RANK, ALPHA, N_ADAPTERS = 16, 32, 16
TASKS = {"": "causal-lm", "past_": "causal-lm-with-past"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Building and exporting (cached)
# --------------------------------------------------------------------------------------------


def adapter_name(i: int) -> str:
    return f"a{i:02d}"


def build_hf(cache: Path) -> tuple[Path, dict[str, Path]]:
    """The base transformers folder and N_ADAPTERS PEFT adapter dirs (random non-zero A, B)."""
    base_dir, adapter_root = cache / "hf_base", cache / "hf_adapters"
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    adapters = {n: adapter_root / n for n in names}
    if (base_dir / "config.json").is_file() and all((p / "adapter_config.json").is_file() for p in adapters.values()):
        return base_dir, adapters
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnx_peft import LoraConfig, get_peft_model

    log("building the Llama-shaped model and 16 adapters")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(base_dir, safe_serialization=True)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
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


def prepare(cache: Path) -> dict[str, Path]:
    """Every model this benchmark runs, exported once (each step skipped when its file exists)."""
    cache.mkdir(parents=True, exist_ok=True)
    base_dir, adapters = build_hf(cache)
    from onnx_peft.export import export

    paths: dict[str, Path] = {}
    for prefix, task in TASKS.items():
        jobs = {
            f"{prefix}base": dict(mode="in-graph"),
            f"{prefix}slots": dict(mode="inputs", adapters=adapters if not prefix else
                                   {n: adapters[n] for n in ("a00", "a01")}),
            f"{prefix}merged": dict(mode="merged", adapters={"a00": adapters["a00"]}),
        }
        for key, kwargs in jobs.items():
            target = cache / key / "model.onnx"
            if not target.is_file():
                log(f"exporting {key} ({task}, {kwargs['mode']})")
                started = time.perf_counter()
                export(base_dir, cache / key, task=task, quiet=True, **kwargs)
                log(f"  done in {time.perf_counter() - started:.0f} s")
            paths[key] = target
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


if __name__ == "__main__" and sys.argv[1:2] == ["--prepare-only"]:
    prepare(Path("/tmp/onnx_peft_bench_rt"))
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# Timing: one interleaved run per question
# --------------------------------------------------------------------------------------------


def interleaved(variants: dict, runs: int, warmup: int, seed: int, label: str) -> dict[str, list[float]]:
    """Call each variant ``warmup`` times, then ``runs`` rounds, each round in a random order."""
    rng = np.random.default_rng(seed)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    started = time.perf_counter()
    for i in range(runs):
        for key in rng.permutation(list(variants)):
            t0 = time.perf_counter()
            variants[key]()
            times[key].append(time.perf_counter() - t0)
        if time.perf_counter() - started > 60 and i % 10 == 9:
            log(f"  {label}: {i + 1}/{runs} rounds")
    return times


def session(path: Path, profile_prefix: str | None = None, threads: int = 0):
    import onnxruntime as ort

    from onnx_peft.runtime import AdapterSession

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return AdapterSession(path, providers=["CPUExecutionProvider"], session_options=options)


def llm_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 32000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


def question_single(paths, args) -> tuple[dict, dict]:
    """batch 1, seq 128: base, adapter off, one adapter, switching, merged, new session."""
    files = adapter_files(paths, "slots")
    feeds = llm_feeds(1, args.seq)
    base, slots, merged = session(paths["base"]), session(paths["slots"]), session(paths["merged"])
    for name in ("a00", "a01"):
        slots.load_adapter(name, files[name])
    toggle = {"n": 0}

    def switching():
        toggle["n"] += 1
        return slots.run(["logits"], feeds, adapter="a01" if toggle["n"] % 2 else "a00")

    def new_session():
        fresh = session(paths["slots"])
        fresh.load_adapter("a01", files["a01"])
        out = fresh.run(["logits"], feeds, adapter="a01")
        del fresh
        gc.collect()
        return out

    # correctness of the comparison: merged == slots + a00, adapter off == base
    ref = base.run(["logits"], feeds)[0]
    checks = {
        "adapter off vs base, max |diff|": float(np.abs(slots.run(["logits"], feeds)[0] - ref).max()),
        "slots+a00 vs merged, max |diff|": float(np.abs(slots.run(["logits"], feeds, adapter="a00")[0]
                                                        - merged.run(["logits"], feeds)[0]).max()),
        "slots+a00 vs base, max |diff|": float(np.abs(slots.run(["logits"], feeds, adapter="a00")[0] - ref).max()),
    }
    variants = {
        "base": lambda: base.run(["logits"], feeds),
        "slots, adapter off": lambda: slots.run(["logits"], feeds),
        "slots, one adapter (fixed)": lambda: slots.run(["logits"], feeds, adapter="a00"),
        "slots, switch adapter every run": switching,
        "merged": lambda: merged.run(["logits"], feeds),
    }
    if not args.no_new_session:
        variants["new session per switch (+load +run)"] = new_session
    times = interleaved(variants, args.runs, args.warmup, args.seed, "batch 1")
    del base, slots, merged
    gc.collect()
    return times, checks


def question_multi(paths, args) -> tuple[dict, dict]:
    """batch 16: base, slot model + one adapter, MultiAdapter shared / 16 distinct / none."""
    batch = 16
    files = adapter_files(paths, "slots")
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    feeds = llm_feeds(batch, args.multi_seq, seed=1)
    base, slots, multi = session(paths["base"]), session(paths["slots"]), session(paths["multi"])
    slots.load_adapter("a00", files["a00"])
    for name in names:
        multi.load_adapter(name, files[name])
    distinct = names[:batch]
    # correctness: row i of the mixed batch equals row i run alone with its adapter on the slot model
    mixed = multi.run(["logits"], feeds, adapter=distinct)[0]
    row = 5
    alone = session(paths["slots"])
    alone.load_adapter(distinct[row], files[distinct[row]])
    single = alone.run(["logits"], {k: v[row:row + 1] for k, v in feeds.items()}, adapter=distinct[row])[0]
    del alone
    checks = {f"multi row {row} vs slot model alone, max |diff|": float(np.abs(mixed[row] - single[0]).max())}
    variants = {
        "base (batch 16)": lambda: base.run(["logits"], feeds),
        "slots, one adapter (batch 16)": lambda: slots.run(["logits"], feeds, adapter="a00"),
        "multi, one shared adapter": lambda: multi.run(["logits"], feeds, adapter=["a00"] * batch),
        "multi, 16 distinct adapters": lambda: multi.run(["logits"], feeds, adapter=distinct),
        "multi, no adapter (ids 0)": lambda: multi.run(["logits"], feeds),
    }
    times = interleaved(variants, args.multi_runs, args.warmup, args.seed + 1, "batch 16")
    del base, slots, multi
    gc.collect()
    return times, checks


def question_generate(paths, args) -> tuple[dict, dict]:
    """Greedy decoding with the KV cache: base, slot model + adapter, merged."""
    files = adapter_files(paths, "past_slots")
    prompt = np.random.default_rng(2).integers(0, 32000, (1, args.prompt)).astype(np.int64)
    base, slots, merged = session(paths["past_base"]), session(paths["past_slots"]), session(paths["past_merged"])
    slots.load_adapter("a00", files["a00"])
    new = args.new_tokens
    out_slots = slots.generate(prompt, new, adapter="a00")
    out_merged = merged.generate(prompt, new)
    out_base = base.generate(prompt, new)
    checks = {"greedy tokens, adapter == merged": bool((out_slots == out_merged).all()),
              "greedy tokens, adapter == base (expected False)": bool((out_slots == out_base).all())}
    variants = {
        "base": lambda: base.generate(prompt, new),
        "slots, one adapter": lambda: slots.generate(prompt, new, adapter="a00"),
        "merged": lambda: merged.generate(prompt, new),
    }
    times = interleaved(variants, args.gen_runs, 1, args.seed + 2, "generate")
    del base, slots, merged
    gc.collect()
    return times, checks


# --------------------------------------------------------------------------------------------
# ORT profiler: kernel time per node, adapter-branch share
# --------------------------------------------------------------------------------------------

# Nodes our passes add: slots (extract/insert: "<module>/lora/A|B|add"), MultiAdapter
# ("<bank>/Gather", "<module>/multi_adapter/..."). Base nodes keep exporter names (node_*).
LORA_NODE = re.compile(r"/lora/|/multi_adapter/|\.bank/Gather")


def parse_profile(path: str, skip_runs: int) -> dict:
    """Kernel events of the runs after the first ``skip_runs``: per-run totals and LoRA part."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if skip_runs else 0
    counted = len(runs) - skip_runs
    total = lora = kernels = lora_kernels = 0
    lora_ops: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        total += e["dur"]
        kernels += 1
        if LORA_NODE.search(node):
            lora += e["dur"]
            lora_kernels += 1
            op = e.get("args", {}).get("op_name", "?")
            lora_ops[op] = lora_ops.get(op, 0) + e["dur"]
    wall = statistics.median(e["dur"] for e in runs[skip_runs:])
    return {"runs": counted, "kernel_us": total / counted, "lora_us": lora / counted,
            "kernels": kernels / counted, "lora_kernels": lora_kernels / counted,
            "lora_ops_us": {k: v / counted for k, v in sorted(lora_ops.items())}, "run_us": wall}


def profile(paths, args) -> dict[str, dict]:
    """One profiling session per variant, all alive at once, their runs interleaved."""
    out_dir = args.cache / "profiles"
    out_dir.mkdir(exist_ok=True)
    files = adapter_files(paths, "slots")
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    b1, b16 = llm_feeds(1, args.seq), llm_feeds(16, args.multi_seq, seed=1)
    specs = {  # key: (model, feeds, adapter)
        "b1 base": ("base", b1, None),
        "b1 slots, adapter off": ("slots", b1, None),
        "b1 slots, one adapter": ("slots", b1, "a00"),
        "b1 merged": ("merged", b1, None),
        "b16 base": ("base", b16, None),
        "b16 slots, one adapter": ("slots", b16, "a00"),
        "b16 multi, shared": ("multi", b16, ["a00"] * 16),
        "b16 multi, 16 distinct": ("multi", b16, names),
        "b16 multi, none": ("multi", b16, None),
    }
    sessions = {}
    for key, (model, feeds, adapter) in specs.items():
        prefix = str(out_dir / re.sub(r"\W+", "_", key))
        sess = session(paths[model], profile_prefix=prefix)
        wanted = names if model == "multi" else ["a00"] if adapter else []
        for name in wanted:
            sess.load_adapter(name, files[name])
        sessions[key] = sess
    rng = np.random.default_rng(args.seed + 3)
    for key in specs:  # one warm-up run each, skipped when parsing
        _, feeds, adapter = specs[key]
        sessions[key].run(["logits"], feeds, adapter=adapter)
    for _ in range(args.profile_runs):
        for key in rng.permutation(list(specs)):
            _, feeds, adapter = specs[key]
            sessions[key].run(["logits"], feeds, adapter=adapter)
    results = {}
    for key, sess in sessions.items():
        path = sess._session.end_profiling()  # AdapterSession exposes no profiler API
        results[key] = parse_profile(path, skip_runs=1)
        os.remove(path)
    sessions.clear()
    gc.collect()
    return results
