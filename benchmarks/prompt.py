"""What do prompt-learning adapters cost in ONNX Runtime (CPU), and what does mixing lengths per row cost?

A virtual token is a position like any other, so the fair yardstick of a prompt adapter with
``p`` virtual tokens on ``s`` tokens is the base model at ``s + p`` tokens (equal total length).

Model: Llama-shaped fp32 (hidden 512, 4 layers, intermediate 1376, 8 heads, 4 KV heads, vocab
4096, ~16M parameters, seeded random weights). Adapters: Hugging Face PEFT prompt tuning with 4,
8, 16 and 32 virtual tokens and prefix tuning with 16 (seeded random values). Built and exported
once, cached in /tmp/onnx_peft_bench_prompt (``--cache``)::

    hf_base/, hf_adapters/NAME/      the transformers folder and the PEFT dirs (+ PyTorch logits)
    base/, base_past/                plain exports (task causal-lm / causal-lm-with-past)
    prompt/, prompt_past/            prompt-ready exports (mode "inputs") + adapters/*.onnx_adapter

Questions, each answered by ONE interleaved run (every variant once per round, random order,
medians), so drift of a shared machine hits all variants alike:

1. batch 1, s real tokens (112): prompt tuning p=16 and prefix tuning q=16 (prefix inputs) on the
   prompt-ready graph, vs the plain base at s + 16 and at s tokens, and the prompt-ready graph
   with no adapter at both lengths (adapter off must cost nothing).
2. greedy generation (prompt 16, 32 new tokens, KV cache): the prompt-ready with-past graph with
   a prefix (fed as the initial past), with a prompt, with none, vs the plain with-past base.
3. batch 8 of s tokens (64) whose rows use prompts of 4, 8, 16, 32 virtual tokens (left-padded to
   32 and masked) vs the same rows as 8 single-row runs vs the batch with every row at 32.

    python benchmarks/prompt.py            # ~4 min on 2 busy cores the first time (4 exports), ~1.5 after
    python benchmarks/prompt.py --quick    # few runs, no BENCHMARKS.md update
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, interleaved, load_average, log, med, session, versions, write_section

SECTION = "## Prompt-learning adapters (benchmarks/prompt.py)"
VOCAB = 4096
MODEL = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
# adapter name: (PEFT config class, virtual tokens)
ADAPTERS = {"p4": ("PromptTuningConfig", 4), "p8": ("PromptTuningConfig", 8),
            "p16": ("PromptTuningConfig", 16), "p32": ("PromptTuningConfig", 32),
            "x16": ("PrefixTuningConfig", 16)}
PAST_ADAPTERS = ("p16", "x16")
ROWS = ["p4", "p8", "p16", "p32", "p32", "p16", "p8", "p4"]  # question 3: one prompt per row
EXPORTS = {  # folder: (task, adapters)
    "base": ("causal-lm", ()),
    "base_past": ("causal-lm-with-past", ()),
    "prompt": ("causal-lm", tuple(ADAPTERS)),
    "prompt_past": ("causal-lm-with-past", PAST_ADAPTERS),
}


def tokens(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)


def feeds_of(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def length(name: str) -> int:
    return ADAPTERS[name][1]


# --------------------------------------------------------------------------------------------
# Building and exporting (cached)
# --------------------------------------------------------------------------------------------


def build_hf(cache: Path, seq: int) -> tuple[Path, dict[str, Path]]:
    """The base folder and one PEFT dir per adapter, with the PeftModel's logits on ``seq`` tokens
    (``torch_logits_<seq>.npy``, the real tokens only) for the parity check."""
    base_dir, root = cache / "hf_base", cache / "hf_adapters"
    dirs = {name: root / name for name in ADAPTERS}
    if all((d / f"torch_logits_{seq}.npy").is_file() for d in dirs.values()):
        return base_dir, dirs
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    log("building the Llama-shaped model and the PEFT prompt / prefix adapters")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL)).eval().save_pretrained(base_dir)
    ids = torch.from_numpy(tokens(1, seq, seed=1))
    for i, (name, (config_class, virtual)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        config = getattr(peft, config_class)(task_type="CAUSAL_LM", num_virtual_tokens=virtual)
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).eval()
        generator = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -seq:]
        model.save_pretrained(dirs[name])
        np.save(dirs[name] / f"torch_logits_{seq}.npy", logits.float().numpy())
        del model
        gc.collect()
    return base_dir, dirs


def prepare(args) -> tuple[dict[str, Path], dict[str, Path]]:
    """Every model this benchmark runs (each export skipped when its file exists)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    base_dir, dirs = build_hf(args.cache, args.seq)
    from onnx_peft import export

    paths = {}
    for key, (task, names) in EXPORTS.items():
        target = args.cache / key / "model.onnx"
        if not target.is_file():
            log(f"exporting {key} ({task}{', mode inputs, adapters ' + ', '.join(names) if names else ''})")
            started = time.perf_counter()
            kwargs = dict(adapters={n: dirs[n] for n in names}, mode="inputs") if names else {}
            export(base_dir, target.parent, task=task, quiet=True, **kwargs)
            log(f"  done in {time.perf_counter() - started:.0f} s")
        paths[key] = target
    return paths, dirs


def open_session(paths: dict[str, Path], key: str, names: tuple[str, ...] | list[str] = ()):
    """An AdapterSession on ``paths[key]`` with ``names`` loaded from the export's adapter files;
    idle threads do not spin (see common.session: spinning biases interleaved sessions)."""
    sess = session(paths[key], spinning=False)
    for name in names:
        sess.load_adapter(name, paths[key].parent / "adapters" / f"{name}.onnx_adapter")
    return sess


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------------------------
# Questions: one interleaved run each
# --------------------------------------------------------------------------------------------


def question_equal_length(paths, dirs, args) -> tuple[dict, dict, dict]:
    """batch 1: prompt p / prefix q on s tokens vs the base at s + p and s; adapter off."""
    s, p, q = args.seq, length("p16"), length("x16")
    short, long = feeds_of(tokens(1, s, seed=1)), feeds_of(tokens(1, s + p, seed=2))
    base, ready = open_session(paths, "base"), open_session(paths, "prompt", ["p16", "x16"])
    run = lambda sess, feeds, adapter=None: sess.run(["logits"], feeds, adapter=adapter)[0]  # noqa: E731
    checks = {
        f"prompt-ready, no adapter vs base, {s} tokens": max_diff(run(ready, short), run(base, short)),
        f"prompt-ready, no adapter vs base, {s + p} tokens": max_diff(run(ready, long), run(base, long)),
        "prompt p=16 vs PEFT PyTorch": max_diff(run(ready, short, "p16"), np.load(dirs["p16"] / f"torch_logits_{s}.npy")),
        "prefix q=16 vs PEFT PyTorch": max_diff(run(ready, short, "x16"), np.load(dirs["x16"] / f"torch_logits_{s}.npy")),
    }
    # variant: (callable, positions the layers run (queries), keys each query attends to at most)
    variants = {
        f"base, {s + p} tokens": (lambda: run(base, long), s + p, s + p),
        f"base, {s} tokens": (lambda: run(base, short), s, s),
        f"prompt-ready, no adapter, {s + p} tokens": (lambda: run(ready, long), s + p, s + p),
        f"prompt-ready, no adapter, {s} tokens": (lambda: run(ready, short), s, s),
        f"prompt tuning p={p}, {s} tokens": (lambda: run(ready, short, "p16"), s + p, s + p),
        f"prefix tuning q={q} (prefix inputs), {s} tokens": (lambda: run(ready, short, "x16"), s, s + q),
    }
    times = interleaved({k: v[0] for k, v in variants.items()}, args.runs, args.warmup, args.seed, "equal length")
    shapes = {k: v[1:] for k, v in variants.items()}
    return times, shapes, checks


def question_generate(paths, args) -> tuple[dict, dict]:
    """Greedy decoding with the KV cache: prefix as the initial past, prompt, none, plain base."""
    prompt, new = tokens(1, args.prompt, seed=3), args.new_tokens
    base, ready = open_session(paths, "base_past"), open_session(paths, "prompt_past", PAST_ADAPTERS)
    out = {name: ready.generate(prompt, new, adapter=name) for name in PAST_ADAPTERS}
    plain = base.generate(prompt, new)
    checks = {
        "greedy tokens, prompt-ready no adapter == base": bool(np.array_equal(ready.generate(prompt, new), plain)),
        "greedy tokens, prefix == base (expected False)": bool(np.array_equal(out["x16"], plain)),
    }
    variants = {
        "base (plain with-past export)": lambda: base.generate(prompt, new),
        "prompt-ready, no adapter": lambda: ready.generate(prompt, new),
        f"prefix tuning q={length('x16')} (initial past)": lambda: ready.generate(prompt, new, adapter="x16"),
        f"prompt tuning p={length('p16')} (at prefill)": lambda: ready.generate(prompt, new, adapter="p16"),
    }
    times = interleaved(variants, args.gen_runs, 1, args.seed + 1, "generate")
    return times, checks


def question_padding(paths, args) -> tuple[dict, dict, dict]:
    """batch 8 mixing prompt lengths: one padded batch vs 8 single-row runs vs all at the longest."""
    s, batch = args.pad_seq, len(ROWS)
    feeds = feeds_of(tokens(batch, s, seed=4))
    rows = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(batch)]
    longest = max(ROWS, key=length)
    ready = open_session(paths, "prompt", sorted(set(ROWS)))
    run = lambda f, adapter: ready.run(["logits"], f, adapter=adapter)[0]  # noqa: E731
    mixed = run(feeds, ROWS)
    checks = {"mixed batch row i vs row i alone, max over rows": max(
        max_diff(mixed[i], run(rows[i], ROWS[i])[0]) for i in range(batch))}
    variants = {
        f"one batch of {batch}, mixed prompts (padded to {length(longest)})": lambda: run(feeds, ROWS),
        f"{batch} single-row runs, each its own prompt": lambda: [run(rows[i], ROWS[i]) for i in range(batch)],
        f"one batch of {batch}, every row p={length(longest)}": lambda: run(feeds, longest),
    }
    real = batch * s + sum(length(n) for n in ROWS)
    padded = batch * (s + length(longest))
    positions = dict(zip(variants, (padded, real, padded)))
    times = interleaved(variants, args.pad_runs, args.warmup, args.seed + 2, "padding")
    return times, positions, checks


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def ms(values: list[float]) -> str:
    return f"{med(values) * 1e3:.1f}"


def report(args, equal, gen, pad) -> tuple[str, list[str]]:
    lines: list[str] = []
    summary: list[str] = []
    s, p, q = args.seq, length("p16"), length("x16")

    times, shapes, _ = equal
    base_long, base_short = med(times[f"base, {s + p} tokens"]), med(times[f"base, {s} tokens"])
    lines += [
        f"1. Batch 1, {s} real tokens; {args.runs} interleaved runs per variant (median).",
        "",
        f"| variant | positions run / keys attended | median ms | x base, {s + p} tokens | x base, {s} tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, values in times.items():
        queries, keys = shapes[key]
        lines.append(f"| {key} | {queries} / {keys} | {ms(values)} | {med(values) / base_long:.3f} | "
                     f"{med(values) / base_short:.3f} |")
    lines.append("")
    prompt, prefix = med(times[f"prompt tuning p={p}, {s} tokens"]), med(times[f"prefix tuning q={q} (prefix inputs), {s} tokens"])
    off_short = med(times[f"prompt-ready, no adapter, {s} tokens"])
    off_long = med(times[f"prompt-ready, no adapter, {s + p} tokens"])
    summary += [
        f"prompt tuning p={p} on {s} tokens / base at {s + p} tokens (equal length): {prompt / base_long:.3f} "
        "(goal 1.00: a virtual token costs what a real one does)",
        f"prefix tuning q={q} on {s} tokens / base at {s} tokens: {prefix / base_short:.3f}; / base at {s + q}: "
        f"{prefix / base_long:.3f} (a prefix adds keys, not positions run through the layers)",
        f"adapter off: prompt-ready graph with no adapter / base at {s} tokens {off_short / base_short:.3f}, "
        f"at {s + p} tokens {off_long / base_long:.3f} (goal 1.00)",
    ]

    gtimes, _ = gen
    gbase = med(gtimes["base (plain with-past export)"])
    lines += [
        f"2. Greedy generation, prompt {args.prompt} tokens, {args.new_tokens} new tokens, batch 1, KV cache "
        f"(causal-lm-with-past); {args.gen_runs} interleaved runs per variant (median).",
        "",
        "| variant | median ms per generate | new tokens/s | x base tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for key, values in gtimes.items():
        lines.append(f"| {key} | {med(values) * 1e3:.0f} | {args.new_tokens / med(values):.1f} | "
                     f"{gbase / med(values):.3f} |")
    lines.append("")
    gprefix = med(gtimes[f"prefix tuning q={q} (initial past)"])
    summary.append(
        f"generate tokens/s, prefix q={q} / plain base: {gbase / gprefix:.3f}; / prompt-ready with no adapter: "
        f"{med(gtimes['prompt-ready, no adapter']) / gprefix:.3f}; prompt-ready with no adapter / plain base: "
        f"{gbase / med(gtimes['prompt-ready, no adapter']):.3f}")

    ptimes, positions, _ = pad
    keys = list(ptimes)
    mixed, single, full = (med(ptimes[k]) for k in keys)
    real, padded = positions[keys[1]], positions[keys[0]]
    lengths = ", ".join(str(length(n)) for n in ROWS)
    lines += [
        f"3. Batch of {len(ROWS)} rows x {args.pad_seq} tokens, prompts of {lengths} virtual tokens; "
        f"{args.pad_runs} interleaved runs per variant (median).",
        "",
        "| variant | positions run | median ms | x mixed batch |",
        "|---|---:|---:|---:|",
    ]
    for key, values in ptimes.items():
        lines.append(f"| {key} | {positions[key]} | {ms(values)} | {med(values) / mixed:.3f} |")
    lines.append("")
    summary += [
        f"mixed-length batch / {len(ROWS)} single-row runs: {mixed / single:.3f} (below 1: batching saves more "
        "than the padding costs)",
        f"padding: the mixed batch runs {padded} positions for {real} real ones ({padded / real:.3f}x); mixed batch "
        f"/ batch with every row at the longest prompt: {mixed / full:.3f} (1.00: a padded virtual token costs "
        "what a real one does)",
    ]
    return "\n".join(lines).rstrip("\n"), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs, no BENCHMARKS.md update")
    parser.add_argument("--runs", type=int, default=60, help="batch-1 runs per variant (default 60)")
    parser.add_argument("--gen-runs", type=int, default=12, help="generate() calls per variant (default 12)")
    parser.add_argument("--pad-runs", type=int, default=20, help="batch-8 runs per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=112, help="real tokens of question 1 (default 112)")
    parser.add_argument("--pad-seq", type=int, default=64, help="real tokens per row of question 3 (default 64)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of generate (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx_peft_bench_prompt"))
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.gen_runs, args.pad_runs, args.warmup = 5, 2, 2, 1
        args.no_write = True
    started = time.perf_counter()
    loads = [load_average()]
    paths, dirs = prepare(args)
    log(f"1. equal length: {args.runs} runs per variant")
    equal = question_equal_length(paths, dirs, args)
    log(f"2. generate: {args.gen_runs} runs per variant")
    gc.collect()  # the previous question's sessions
    gen = question_generate(paths, args)
    gc.collect()
    log(f"3. mixed prompt lengths: {args.pad_runs} runs per variant")
    pad = question_padding(paths, args)
    loads.append(load_average())
    seconds = time.perf_counter() - started
    tables, summary = report(args, equal, gen, pad)
    checks = {**equal[2], **gen[1], **pad[2]}
    check_text = "; ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in checks.items())
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, ONNX Runtime CPU provider, default threads, no spinning; "
               f"load average (1 min) at start/end: {', '.join(f'{x:.1f}' for x in loads)}; {versions()}")
    text = "\n".join([tables, "", "Summary:", *[f"- {line}" for line in summary], "", f"Checks: {check_text}"])
    print()
    print(text)
    print(f"\nMachine: {machine}. Took {seconds / 60:.1f} min.")
    (args.cache / "last_run.json").write_text(json.dumps(
        {"equal": equal[0], "generate": gen[0], "padding": pad[0], "checks": checks, "loads": loads}, indent=1))
    if args.no_write:
        return 0
    defaults = (60, 12, 20, 112, 64)
    command = "python benchmarks/prompt.py" + (
        "" if (args.runs, args.gen_runs, args.pad_runs, args.seq, args.pad_seq) == defaults
        else f" --runs {args.runs} --gen-runs {args.gen_runs} --pad-runs {args.pad_runs} --seq {args.seq} "
             f"--pad-seq {args.pad_seq}")
    section = "\n".join([
        SECTION,
        "",
        "Llama-shaped fp32 model (hidden 512, 4 layers, intermediate 1376, 8 heads, 4 KV heads, vocab 4096, ~16M",
        "params, seeded random weights); Hugging Face PEFT prompt tuning (4, 8, 16, 32 virtual tokens) and prefix",
        "tuning (16) with seeded random values. `base` is the plain export (no prompt inputs); `prompt-ready` is",
        "`export(..., adapters=..., mode=\"inputs\")`, one graph for every adapter, run through `AdapterSession`.",
        "A prompt of p virtual tokens runs s + p positions through every layer (its logits are cut to s), so the",
        "yardstick is the base at equal total length; a prefix of q adds q keys to attention, not positions.",
        "Wall-clock ratios from one interleaved run per table (random order each round, medians). Sessions run with",
        "`session.intra_op.allow_spinning=0`: with ORT's default spinning, one session's idle pool slows the next",
        "session's run on 2 shared cores, which read the plain base 20-25% slower than the prompt-ready graph here.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine}. Run took {seconds / 60:.1f} min.",
        "",
        text,
        "",
    ])
    write_section(SECTION, section, args.output)
    log(f"wrote {SECTION!r} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
