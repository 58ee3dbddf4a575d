"""The timed questions of benchmarks/runtime.py, each one interleaved run over its variants
(random order per round, medians), plus the correctness checks that make its ratios comparable.

Strategy "merge" sessions (AdapterSession(strategy="merge")) open the slot model and run the base
graph with the active adapter folded into the weights; their rows sit next to the slot rows.
"""

from __future__ import annotations

import gc

import numpy as np
from common import device_session, interleaved
from runtime_models import N_ADAPTERS, adapter_files, adapter_name, llm_feeds


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


class Toggle:
    """Alternates between two adapters, one call after another (every call is a swap)."""

    def __init__(self, first: str, second: str) -> None:
        self.names, self.n = (first, second), 0

    def __call__(self) -> str:
        self.n += 1
        return self.names[self.n % 2]


def ort_lora_adapter(model, adapter_file, device: str):
    """ONNX Runtime's own multi-LoRA API on the same slot model: a plain InferenceSession (same
    provider, TF32 off) and RunOptions with the ``.onnx_adapter`` file active."""
    import onnxruntime as ort

    providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=providers)
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    return session, run_options, adapter  # the caller keeps the adapter alive with the options


def question_single(paths, args, vocab: int) -> tuple[dict, dict]:
    """batch 1, seq 128: base, slots (off / one / switching), strategy merge (off / one / swap /
    switching), merged export, new session per switch."""
    device = args.device
    files = adapter_files(paths, "slots")
    feeds = llm_feeds(1, args.seq, vocab=vocab)
    base, slots, merged = (device_session(paths[k], device) for k in ("base", "slots", "merged"))
    # merge: a fixed adapter; swap: activate() alternating; swap_run: run() alternating (swap + run)
    merge, swap, swap_run = (device_session(paths["slots"], device, strategy="merge") for _ in range(3))
    for sess in (slots, merge, swap, swap_run):
        for name in ("a00", "a01"):
            sess.load_adapter(name, files[name])
    merge.activate("a00")
    switch_slots, switch_activate, switch_merge = Toggle("a00", "a01"), Toggle("a00", "a01"), Toggle("a00", "a01")

    def new_session():
        fresh = device_session(paths["slots"], device)
        fresh.load_adapter("a01", files["a01"])
        out = fresh.run(["logits"], feeds, adapter="a01")
        del fresh
        gc.collect()
        return out

    def logits(sess, adapter=None):
        return sess.run(["logits"], feeds, adapter=adapter)[0]

    ort_lora, lora_options, _lora = ort_lora_adapter(paths["slots"], files["a00"], device)

    ref, with_a00 = logits(base), logits(slots, "a00")
    checks = {
        "adapter off vs base, max |diff|": max_diff(logits(slots), ref),
        "slots+a00 vs merged, max |diff|": max_diff(with_a00, logits(merged)),
        "slots+a00 vs base, max |diff|": max_diff(with_a00, ref),
        "merge strategy+a00 vs slots+a00, max |diff|": max_diff(logits(merge, "a00"), with_a00),
        "merge strategy, adapter off vs base, max |diff|": max_diff(logits(merge), ref),
        "ORT LoraAdapter a00 vs slots+a00, max |diff|": max_diff(ort_lora.run(["logits"], feeds, lora_options)[0],
                                                                 with_a00),
    }
    variants = {
        "base": lambda: base.run(["logits"], feeds),
        "slots, adapter off": lambda: slots.run(["logits"], feeds),
        "slots, one adapter (fixed)": lambda: slots.run(["logits"], feeds, adapter="a00"),
        "slots, switch adapter every run": lambda: slots.run(["logits"], feeds, adapter=switch_slots()),
        "ORT's own LoraAdapter, one adapter (same slot model)": lambda: ort_lora.run(["logits"], feeds, lora_options),
        "merge strategy, adapter off": lambda: merge.run(["logits"], feeds),
        "merge strategy, one adapter (active)": lambda: merge.run(["logits"], feeds, adapter="a00"),
        "merge strategy, switch adapter every run (swap + run)": lambda: swap_run.run(
            ["logits"], feeds, adapter=switch_merge()),
        "merge strategy, activate() the other adapter (swap only)": lambda: swap.activate(switch_activate()),
        "merged": lambda: merged.run(["logits"], feeds),
    }
    if not args.no_new_session:
        variants["new session per switch (+load +run)"] = new_session
    times = interleaved(variants, args.runs, args.warmup, args.seed, "batch 1")
    gc.collect()
    return times, checks


def question_multi(paths, args, vocab: int) -> tuple[dict, dict]:
    """batch 16: base, slot model + one adapter, strategy merge + one adapter, MultiAdapter
    shared / 16 distinct / none."""
    device, batch = args.device, 16
    files = adapter_files(paths, "slots")
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    feeds = llm_feeds(batch, args.multi_seq, seed=1, vocab=vocab)
    base, slots, multi = (device_session(paths[k], device) for k in ("base", "slots", "multi"))
    merge = device_session(paths["slots"], device, strategy="merge")
    slots.load_adapter("a00", files["a00"])
    merge.load_adapter("a00", files["a00"])
    merge.activate("a00")
    for name in names:
        multi.load_adapter(name, files[name])
    distinct = names[:batch]
    # correctness: row i of the mixed batch equals row i run alone with its adapter on the slot model
    mixed = multi.run(["logits"], feeds, adapter=distinct)[0]
    row = 5
    alone = device_session(paths["slots"], device)
    alone.load_adapter(distinct[row], files[distinct[row]])
    single = alone.run(["logits"], {k: v[row : row + 1] for k, v in feeds.items()}, adapter=distinct[row])[0]
    del alone
    checks = {f"multi row {row} vs slot model alone, max |diff|": max_diff(mixed[row], single[0])}
    variants = {
        "base (batch 16)": lambda: base.run(["logits"], feeds),
        "slots, one adapter (batch 16)": lambda: slots.run(["logits"], feeds, adapter="a00"),
        "merge strategy, one adapter (batch 16)": lambda: merge.run(["logits"], feeds, adapter="a00"),
        "multi, one shared adapter": lambda: multi.run(["logits"], feeds, adapter=["a00"] * batch),
        "multi, 16 distinct adapters": lambda: multi.run(["logits"], feeds, adapter=distinct),
        "multi, no adapter (ids 0)": lambda: multi.run(["logits"], feeds),
    }
    times = interleaved(variants, args.multi_runs, args.warmup, args.seed + 1, "batch 16")
    gc.collect()
    return times, checks


def question_generate(paths, args, vocab: int) -> tuple[dict, dict]:
    """Greedy decoding with the KV cache: base, slot model + adapter, strategy merge + adapter, merged."""
    device = args.device
    files = adapter_files(paths, "past_slots")
    prompt = np.random.default_rng(2).integers(0, vocab, (1, args.prompt)).astype(np.int64)
    base, slots, merged = (device_session(paths[k], device) for k in ("past_base", "past_slots", "past_merged"))
    merge = device_session(paths["past_slots"], device, strategy="merge")
    slots.load_adapter("a00", files["a00"])
    merge.load_adapter("a00", files["a00"])
    merge.activate("a00")
    new = args.new_tokens
    out_slots = slots.generate(prompt, new, adapter="a00")
    out_merge = merge.generate(prompt, new, adapter="a00")
    out_merged = merged.generate(prompt, new)
    out_base = base.generate(prompt, new)
    checks = {
        "greedy tokens, adapter == merged": bool((out_slots == out_merged).all()),
        "greedy tokens, merge strategy == adapter": bool((out_merge == out_slots).all()),
        "greedy tokens, adapter == base (expected False)": bool((out_slots == out_base).all()),
    }
    bare = bare_greedy(paths["past_base"], device)
    checks["greedy tokens, bare ORT loop == base"] = bool((bare(prompt, new) == out_base).all())
    peft = peft_greedy(paths["hf_base"], paths["hf_a00"], device, args.dtype)
    if peft is not None:
        checks["greedy tokens, HF PEFT generate == adapter"] = bool((peft(prompt, new) == out_slots).all())
    variants = {
        "base": lambda: base.generate(prompt, new),
        "base, bare ORT loop (IO binding, numpy argmax)": lambda: bare(prompt, new),
        "slots, one adapter": lambda: slots.generate(prompt, new, adapter="a00"),
        "merge strategy, one adapter (active)": lambda: merge.generate(prompt, new, adapter="a00"),
        "merged": lambda: merged.generate(prompt, new),
    }
    if peft is not None:
        variants["HF PEFT generate, one adapter (torch eager)"] = lambda: peft(prompt, new)
    times = interleaved(variants, args.gen_runs, 1, args.seed + 2, "generate")
    gc.collect()
    return times, checks


def bare_greedy(model, device: str):
    """The base model decoded the way a user writes it by hand: one InferenceSession, IO binding
    keeping ``present.*`` where the model runs, the full logits back to numpy for the argmax."""
    import onnxruntime as ort

    providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=providers)
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    dtype = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32

    def run(prompt: np.ndarray, new: int) -> np.ndarray:
        batch, tokens = prompt.shape[0], prompt
        past = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(
            (batch, inputs[n].shape[1], 0, inputs[n].shape[3]), dtype), device, 0) for n in past_names}
        current, length = prompt, prompt.shape[1]
        for _ in range(new):
            binding = session.io_binding()
            binding.bind_cpu_input("input_ids", current)
            binding.bind_cpu_input("attention_mask", np.ones((batch, length), np.int64))
            if "position_ids" in inputs:
                binding.bind_cpu_input("position_ids", np.arange(length - current.shape[1], length, dtype=np.int64)[None]
                                       .repeat(batch, 0))
            for name, value in past.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            presents = ["present." + n[len("past_key_values."):] for n in past_names]
            for name in presents:
                binding.bind_output(name, device)
            session.run_with_iobinding(binding)
            logits, *values = binding.get_outputs()
            chosen = logits.numpy()[:, -1, :].astype(np.float32).argmax(-1)[:, None].astype(np.int64)
            tokens = np.concatenate([tokens, chosen], axis=1)
            past = dict(zip(past_names, values))
            current, length = chosen, length + 1
        return tokens

    return run


def peft_greedy(base_dir, adapter_dir, device: str, dtype: str):
    """HF PEFT's own generate on the same base and adapter (torch eager), or None without peft."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype).to(device)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()

    def run(prompt: np.ndarray, new: int) -> np.ndarray:
        ids = torch.from_numpy(prompt).to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        return out.cpu().numpy()

    return run
