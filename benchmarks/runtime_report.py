"""The tables and summary of benchmarks/runtime.py: one table per question, a kernel-count table
from the profiler, and the goals each ratio answers. Every part is optional (``--questions``)."""

from __future__ import annotations

from common import med

KERNEL_ROWS = {  # kernel-count table: label -> profile key
    "base": "b1 base",
    "slots, adapter off": "b1 slots, adapter off",
    "slots, one adapter": "b1 slots, one adapter",
    "merge strategy, adapter off": "b1 merge strategy, adapter off",
    "merge strategy, one adapter": "b1 merge strategy, one adapter",
    "merged export": "b1 merged",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def single_table(args, t1: dict, prof: dict) -> tuple[list[str], list[str]]:
    lines, goals = [], []
    base = med(t1["base"])
    kb = prof.get("b1 base", {}).get("kernel_us")
    profiled = f"; profiler {args.profile_runs} runs per variant" if prof else ""
    lines += [
        f"Batch 1, seq {args.seq}: {args.runs} interleaved runs per variant (median){profiled}",
        "",
        "| variant | median ms | x base (wall) | kernel ms/run | x base (kernel) | non-adapter kernels x base "
        "| kernels/run | adapter kernels/run | adapter share of kernel time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pmap = {"base": "b1 base", "slots, adapter off": "b1 slots, adapter off",
            "slots, one adapter (fixed)": "b1 slots, one adapter",
            "merge strategy, adapter off": "b1 merge strategy, adapter off",
            "merge strategy, one adapter (active)": "b1 merge strategy, one adapter", "merged": "b1 merged"}
    for key, values in t1.items():
        p = prof.get(pmap.get(key, ""))
        cells = [""] * 6 if p is None or kb is None else [
            f"{p['kernel_us'] / 1e3:.1f}", f"{p['kernel_us'] / kb:.3f}", f"{p['base_us'] / kb:.3f}",
            f"{p['kernels']:.0f}", f"{p['lora_kernels']:.0f}", f"{100 * p['lora_us'] / p['kernel_us']:.1f}%"]
        lines.append(f"| {key} | {_ms(med(values))} | {med(values) / base:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    fixed, switch = med(t1["slots, one adapter (fixed)"]), med(t1["slots, switch adapter every run"])
    if prof:
        off, one, bp = prof["b1 slots, adapter off"], prof["b1 slots, one adapter"], prof["b1 base"]
        goals.append(
            f"adapter off / base: {off['kernels'] - bp['kernels']:.0f} extra kernels/run "
            f"({', '.join(f'{op} {us / 1e3:.2f}' for op, us in off['lora_ops_us'].items())} ms), kernel time "
            f"1 + adapter/other = {1 + off['lora_us'] / off['base_us']:.4f}; direct kernel ratio "
            f"{off['kernel_us'] / bp['kernel_us']:.3f}, wall {med(t1['slots, adapter off']) / base:.3f} (goal 1.00)")
        goals.append(
            f"one adapter / base: kernel time 1 + adapter/other = {1 + one['lora_us'] / one['base_us']:.4f} "
            f"(sum of per-node medians) / "
            f"{1 + one['run_lora_us'] / (one['run_kernel_us'] - one['run_lora_us']):.4f} (median of per-run sums); "
            f"direct kernel ratio {one['kernel_us'] / bp['kernel_us']:.3f}, wall {fixed / base:.3f} "
            "(goal <= 1.03 by kernel time)")
    goals.append(f"switch every run / fixed adapter: {switch / fixed:.3f} (goal: no measurable difference)")
    theirs = t1.get("ORT's own LoraAdapter, one adapter (same slot model)")
    if theirs:
        goals.append(f"ORT's own LoraAdapter / base, wall: {med(theirs) / base:.3f}; vs AdapterSession with the same "
                     f"adapter {med(theirs) / fixed:.3f}")
    if "new session per switch (+load +run)" in t1:
        fresh = med(t1["new session per switch (+load +run)"])
        goals.append(f"new InferenceSession per switch (+load +run) / switch in one session: {fresh / switch:.1f}x "
                     f"({fresh * 1e3:.0f} ms vs {switch * 1e3:.0f} ms)")
    m_off, m_one = med(t1["merge strategy, adapter off"]), med(t1["merge strategy, one adapter (active)"])
    swap = med(t1["merge strategy, activate() the other adapter (swap only)"])
    swap_run = med(t1["merge strategy, switch adapter every run (swap + run)"])
    goals.append(f"strategy merge / base, wall: adapter active {m_one / base:.3f}, adapter off {m_off / base:.3f} "
                 f"(goal 1.00); vs slots with one adapter {m_one / fixed:.3f}")
    goals.append(f"strategy merge swap (activate() alternating two adapters): {swap * 1e3:.1f} ms = "
                 f"{swap / base:.2f} x one prefill of the base (batch 1, seq {args.seq}, {base * 1e3:.1f} ms); "
                 f"swap + run {swap_run * 1e3:.1f} ms vs slots switching {switch * 1e3:.1f} ms")
    merged = med(t1["merged"])
    kernel = f", kernel time {prof['b1 merged']['kernel_us'] / prof['b1 base']['kernel_us']:.3f}" if prof else ""
    goals.append(f"merged export / base: wall {merged / base:.3f}{kernel} (sanity: 1.00)")
    return lines, goals


def multi_table(args, t2: dict, prof: dict) -> tuple[list[str], list[str]]:
    lines, goals = [], []
    tokens = 16 * args.multi_seq
    base16 = med(t2["base (batch 16)"])
    kb16 = prof.get("b16 base", {}).get("kernel_us")
    pmap = {"base (batch 16)": "b16 base", "slots, one adapter (batch 16)": "b16 slots, one adapter",
            "merge strategy, one adapter (batch 16)": "b16 merge strategy, one adapter",
            "multi, one shared adapter": "b16 multi, shared", "multi, 16 distinct adapters": "b16 multi, 16 distinct",
            "multi, no adapter (ids 0)": "b16 multi, none"}
    lines += [
        f"Batch 16, seq {args.multi_seq} ({tokens} tokens per run): {args.multi_runs} interleaved runs per "
        "variant (median)",
        "",
        "| variant | median ms | tokens/s | throughput x base | x base (kernel) | non-adapter kernels x base "
        "| adapter share of kernel time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, values in t2.items():
        p = prof.get(pmap[key])
        cells = [""] * 3 if p is None or kb16 is None else [
            f"{p['kernel_us'] / kb16:.3f}", f"{p['base_us'] / kb16:.3f}", f"{100 * p['lora_us'] / p['kernel_us']:.1f}%"]
        lines.append(f"| {key} | {_ms(med(values))} | {tokens / med(values):.0f} | {base16 / med(values):.3f} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    distinct, shared = med(t2["multi, 16 distinct adapters"]), med(t2["multi, one shared adapter"])
    by_kernel = ""
    if prof:
        pd = prof["b16 multi, 16 distinct"]
        by_kernel = (f", by kernel time 1 / (1 + adapter/other) = {1 / (1 + pd['lora_us'] / pd['base_us']):.3f}, "
                     f"direct {kb16 / pd['kernel_us']:.3f}")
    goals.append(
        f"per-row multi-adapter, batch 16 x seq {args.multi_seq}, 16 distinct adapters: throughput / base "
        f"wall {base16 / distinct:.3f}{by_kernel} (goal >= 0.80); vs one shared adapter on the same model "
        f"{shared / distinct:.3f}; vs slot model with one adapter "
        f"{med(t2['slots, one adapter (batch 16)']) / distinct:.3f}; vs strategy merge with one adapter "
        f"{med(t2['merge strategy, one adapter (batch 16)']) / distinct:.3f}")
    if prof:
        top = sorted(prof["b16 multi, 16 distinct"]["lora_ops_us"].items(), key=lambda kv: -kv[1])[:4]
        goals.append("multi (16 distinct) adapter kernels by op, ms/run: "
                     + ", ".join(f"{op} {us / 1e3:.1f}" for op, us in top))
        ps, pn, po = prof["b16 multi, shared"], prof["b16 multi, none"], prof["b16 slots, one adapter"]
        goals.append(
            f"multi, one shared adapter: 1 + adapter/other = {1 + ps['lora_us'] / ps['base_us']:.3f}; "
            f"multi, no adapter (all ids 0): {1 + pn['lora_us'] / pn['base_us']:.3f} (the full banks are "
            f"still fed and multiplied); slot model, one adapter: {1 + po['lora_us'] / po['base_us']:.3f}")
    return lines, goals


def generate_table(args, t3: dict, prof: dict) -> tuple[list[str], list[str]]:
    lines, goals = [], []
    gb = med(t3["base"])
    lines += [
        f"Greedy generation, prompt {args.prompt}, {args.new_tokens} new tokens, batch 1, KV cache "
        f"(causal-lm-with-past): {args.gen_runs} interleaved runs per variant (median)",
        "",
        "| variant | median ms per generate | tokens/s | x base tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for key, values in t3.items():
        lines.append(f"| {key} | {med(values) * 1e3:.0f} | {args.new_tokens / med(values):.1f} | "
                     f"{gb / med(values):.3f} |")
    lines.append("")
    adapter = med(t3["slots, one adapter"])
    goals.append(f"generation tokens/s, adapter / merged: wall {med(t3['merged']) / adapter:.3f}; "
                 f"strategy merge / merged: {med(t3['merged']) / med(t3['merge strategy, one adapter (active)']):.3f}")
    per_token = {key: 1e3 * med(values) / args.new_tokens for key, values in t3.items()}
    bare = per_token.get("base, bare ORT loop (IO binding, numpy argmax)")
    theirs = per_token.get("HF PEFT generate, one adapter (torch eager)")
    goals.append(f"ms per token: AdapterSession base {per_token['base']:.2f}" +
                 (f" vs a bare ORT loop {bare:.2f}" if bare else "") +
                 f"; one adapter {per_token['slots, one adapter']:.2f}" +
                 (f" vs HF PEFT generate {theirs:.2f} ({theirs / per_token['slots, one adapter']:.2f}x ours)"
                  if theirs else ""))
    if prof:
        db, da = prof["decode base"], prof["decode slots, one adapter"]
        dg, dm = prof["decode merge strategy, one adapter"], prof["decode merged"]
        goals.append(
            f"one decode step (past {args.prompt}), profiler: kernel ms base {db['kernel_us'] / 1e3:.1f}, adapter "
            f"{da['kernel_us'] / 1e3:.1f} ({da['lora_kernels']:.0f} adapter kernels, "
            f"{100 * da['lora_us'] / da['kernel_us']:.1f}% / {100 * da['run_lora_us'] / da['run_kernel_us']:.1f}% "
            f"of kernel time), strategy merge {dg['kernel_us'] / 1e3:.1f}, merged {dm['kernel_us'] / 1e3:.1f}; "
            f"model_run ms base {db['run_us'] / 1e3:.1f}, adapter {da['run_us'] / 1e3:.1f}, strategy merge "
            f"{dg['run_us'] / 1e3:.1f}, merged {dm['run_us'] / 1e3:.1f}")
    return lines, goals


def kernel_table(prof: dict) -> tuple[list[str], list[str]]:
    """Kernels one run launches (batch 1): strategy merge must launch exactly the base's."""
    lines = [
        "Kernels per run (ORT profiler, batch 1)",
        "",
        "| variant | kernels/run | adapter kernels/run | kernel ms/run |",
        "|---|---:|---:|---:|",
    ]
    for label, key in KERNEL_ROWS.items():
        p = prof[key]
        lines.append(f"| {label} | {p['kernels']:.0f} | {p['lora_kernels']:.0f} | {p['kernel_us'] / 1e3:.1f} |")
    lines.append("")
    base = prof["b1 base"]
    same = [prof[f"b1 merge strategy, {k}"]["kernels"] == base["kernels"] for k in ("adapter off", "one adapter")]
    merge = prof["b1 merge strategy, one adapter"]
    ops = sorted(set(base["op_kernels"]) | set(merge["op_kernels"]))
    extra = {op: merge["op_kernels"].get(op, 0) - base["op_kernels"].get(op, 0) for op in ops}
    differ = ", ".join(f"{op} {n:+.0f}" for op, n in extra.items() if round(n))
    goals = [f"strategy merge launches the base's kernels: adapter off {same[0]}, one adapter {same[1]} "
             f"({merge['kernels']:.0f} vs {base['kernels']:.0f} per run{'; ' + differ if differ else ''})"]
    return lines, goals


def report(args, results: dict) -> str:
    """The tables, the summary and the checks of one run (``results``: question -> (times, checks)
    for the questions run, "profile" -> the profiler's dict or {})."""
    prof = results.get("profile", {})
    lines: list[str] = []
    goals: list[str] = []
    checks: dict = {}
    for question, table in (("single", single_table), ("multi", multi_table), ("generate", generate_table)):
        if question in results:
            times, found = results[question]
            more_lines, more_goals = table(args, times, prof)
            lines += more_lines
            goals += more_goals
            checks.update(found)
    if "b1 base" in prof:
        more_lines, more_goals = kernel_table(prof)
        lines += more_lines
        goals += more_goals
    check_lines = [f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in checks.items()]
    return "\n".join(lines + ["Summary:", *[f"- {g}" for g in goals], "", "Checks: " + "; ".join(check_lines)])
