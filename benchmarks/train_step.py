"""Is a LoRA training step with onnx-peft as fast and as lean as with Hugging Face PEFT?

Same Llama-shaped model (hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000),
LoRA r=16 on all linear layers, fp32 on CPU, one step = forward + backward + AdamW step.

- Time: both models live in one process; steps alternate ours/PEFT in a random order per
  round, so drift in machine load hits both sides alike. Median step time per side.
- Memory: each side runs alone in a fresh subprocess, twice, alternating; the lower peak RSS
  (ru_maxrss) and growth of the peak over the RSS before the first step (activations,
  gradients, optimizer state) count. RSS moves by ~20 MiB run to run with the allocator, so
  we also count the bytes autograd saves for backward in one forward (exact, repeatable).

Prints ratios ours/PEFT and writes the "## Training step" section of BENCHMARKS.md::

    python benchmarks/train_step.py            # ~3-4 min on 2 busy cores
    python benchmarks/train_step.py --steps 20 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, write_section

SECTION = "## Training step (benchmarks/train_step.py)"
SIDES = ("ours", "peft")


def build(side: str, rank: int):
    """A fresh seeded Llama-shaped model with a LoRA adapter from ``side``'s library."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    base = LlamaForCausalLM(config)
    if side == "ours":
        from onnx_peft import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_step(model, optimizer, ids: torch.Tensor):
    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def batch(size: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 32000, (size, seq), generator=torch.Generator().manual_seed(0))


def current_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def child(side: str, args: argparse.Namespace) -> None:
    """One side alone in this process: print its memory figures as JSON."""
    model, optimizer = build(side, args.rank)
    step = make_step(model, optimizer, batch(args.batch, args.seq))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = current_rss_mib()
    for _ in range(args.memory_steps):
        step()
    print(json.dumps({"side": side, "rss_before": before, "peak": peak_rss_mib(), "trainable": trainable}))


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(args.memory_repeats):
        order = list(SIDES)
        random.shuffle(order)
        for side in order:
            cmd = [sys.executable, __file__, "--child", side, "--rank", str(args.rank), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            run["growth"] = run["peak"] - run["rss_before"]
            best = results.setdefault(side, run)
            best["peak"], best["growth"] = min(best["peak"], run["peak"]), min(best["growth"], run["growth"])
    return results


def saved_activations_mib(model, ids: torch.Tensor) -> float:
    """Bytes autograd keeps for backward in one forward, parameters excluded."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


def measure_time(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    ids = batch(args.batch, args.seq)
    models = {side: build(side, args.rank) for side in SIDES}
    saved = {side: saved_activations_mib(models[side][0], ids) for side in SIDES}
    steps = {side: make_step(*models[side], ids) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    rng = random.Random(args.seed)
    for round_index in range(args.warmup + args.steps):
        order = list(SIDES)
        rng.shuffle(order)
        for side in order:
            elapsed = steps[side]()
            if round_index >= args.warmup:
                times[side].append(elapsed)
        print(f"  round {round_index + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{s} {times[s][-1]:.3f}s" if times[s] else f"{s} warm-up" for s in SIDES), flush=True)
    return times, saved


def versions() -> str:
    import peft
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (default 2)")
    parser.add_argument("--memory-repeats", type=int, default=2, help="memory subprocesses per side (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady figures on a shared machine; 0 = torch's default)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0

    random.seed(args.seed)
    print(f"memory: each side alone in a subprocess, {args.memory_steps} steps", flush=True)
    memory = measure_memory(args)
    if memory["ours"]["trainable"] != memory["peft"]["trainable"]:
        print(f"warning: trainable parameters differ: {memory['ours']['trainable']} vs {memory['peft']['trainable']}")
    print(f"time: {args.warmup} warm-up + {args.steps} measured steps per side, interleaved", flush=True)
    times, saved = measure_time(args)

    median = {s: statistics.median(times[s]) for s in SIDES}
    spread = {s: (min(times[s]), max(times[s])) for s in SIDES}
    growth = {s: memory[s]["growth"] for s in SIDES}
    rows = [
        ("median step time (s)", f"{median['ours']:.3f}", f"{median['peft']:.3f}", median["ours"] / median["peft"]),
        ("peak RSS (MiB)", f"{memory['ours']['peak']:.0f}", f"{memory['peft']['peak']:.0f}",
         memory["ours"]["peak"] / memory["peft"]["peak"]),
        ("peak RSS growth in training (MiB)", f"{growth['ours']:.0f}", f"{growth['peft']:.0f}",
         growth["ours"] / growth["peft"]),
        ("autograd saved activations (MiB)", f"{saved['ours']:.1f}", f"{saved['peft']:.1f}",
         saved["ours"] / saved["peft"]),
    ]
    table = ["| metric | onnx-peft | HF PEFT | ours/PEFT |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {a} | {b} | {ratio:.3f} |" for name, a, b, ratio in rows]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"{torch.get_num_threads()} torch threads, load average {load:.1f} at the end; {versions()}")
    details = (f"Step time range: ours {spread['ours'][0]:.3f}-{spread['ours'][1]:.3f} s, "
               f"PEFT {spread['peft'][0]:.3f}-{spread['peft'][1]:.3f} s. "
               f"Trainable parameters: ours {memory['ours']['trainable']:,}, PEFT {memory['peft']['trainable']:,}.")
    command = (f"python benchmarks/train_step.py --steps {args.steps} --batch {args.batch} --seq {args.seq} "
               f"--rank {args.rank} --threads {args.threads} --memory-repeats {args.memory_repeats}")
    section = "\n".join([
        SECTION, "",
        "LoRA r=16 (alpha 32) on all linear layers of a Llama-shaped model (hidden 1024, 4 layers,",
        "intermediate 2816, 16 heads, vocab 32000), fp32 on CPU, batch "
        f"{args.batch} x seq {args.seq}; a step is forward + backward + AdamW.",
        "Time: both models in one process, steps interleaved in random order after "
        f"{args.warmup} warm-up rounds, {args.steps} measured steps per side. Memory: each side alone in a",
        f"subprocess ({args.memory_steps} steps, {args.memory_repeats} runs, lower figure kept), ru_maxrss; growth = peak",
        "minus RSS before the first step; saved activations = bytes autograd keeps for backward (exact).", "",
        "```", command, "```", "",
        f"Machine: {machine}.", "",
        *table, "",
        details, "",
    ])
    print()
    print(section)
    if not args.no_write:
        write_section(SECTION, section, Path(args.output))
        print(f"updated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
