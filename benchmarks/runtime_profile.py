"""ORT profiler for benchmarks/runtime.py: kernel time per node, kernel count, adapter-branch share.

Wall-clock ratios on a shared 2-core box move by several percent, so the profiler gives the
stable figure: per variant, kernel time summed per node over profiled runs, the number of kernels
a run launches, and the share that belongs to adapter branches (nodes that exist only because of
the slots or banks). On CUDA a node's time is ORT's host-side time for it (kernels launch
asynchronously), so there the kernel count is the figure and wall-clock the time.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
from pathlib import Path

import numpy as np
from common import device_session
from runtime_models import N_ADAPTERS, adapter_files, adapter_name, decode_feeds, llm_feeds

# Nodes our passes add: branches (graph/branch.py, every method's forms: "<module>/adapter/<suffix>",
# e.g. lora_A, lora_B, lora_add), MultiAdapter ("<bank>/Gather", "<module>/multi_adapter/...").
# Base nodes keep exporter names (node_*).
LORA_NODE = re.compile(r"/adapter/|/multi_adapter/|\.bank/Gather")


def node_kernel_events(events: list[dict], skip_runs: int) -> tuple[list[tuple[float, float]], dict, dict]:
    """The (start, end) of each run after the first ``skip_runs``, each node's kernel durations in
    them (us) and each node's op type, from an ORT profile's events."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    bounds = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    per_node: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in bounds):
            continue
        node = e["name"][: -len("_kernel_time")]
        per_node.setdefault(node, []).append(e["dur"])
        ops[node] = e.get("args", {}).get("op_name", "?")
    return bounds, per_node, ops


def parse_profile(path: str, skip_runs: int) -> dict:
    """Kernel events of the runs after the first ``skip_runs``.

    Each node's kernel time is the median over the runs (robust to a preempted kernel on a
    shared machine); a variant's kernel time is the sum of its nodes' medians.
    """
    events = json.loads(Path(path).read_text())
    bounds, per_node, ops = node_kernel_events(events, skip_runs)
    counted = len(bounds)
    total = lora = kernels = lora_kernels = 0.0
    lora_ops: dict[str, float] = {}
    op_kernels: dict[str, float] = {}
    for node, durs in per_node.items():
        # a node runs once per run here (no control flow), so len(durs) == counted
        value = statistics.median(durs) * len(durs) / counted
        total += value
        kernels += len(durs) / counted
        op_kernels[ops[node]] = op_kernels.get(ops[node], 0) + len(durs) / counted
        if LORA_NODE.search(node):
            lora += value
            lora_kernels += len(durs) / counted
            lora_ops[ops[node]] = lora_ops.get(ops[node], 0) + value
    # second estimator: median over runs of each run's sums (keeps the tails a per-node median drops)
    run_total, run_lora = [0.0] * counted, [0.0] * counted
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (lo, hi) in enumerate(bounds):
                if lo <= e["ts"] <= hi:
                    run_total[i] += e["dur"]
                    if LORA_NODE.search(e["name"]):
                        run_lora[i] += e["dur"]
                    break
    wall = statistics.median(hi - lo for lo, hi in bounds)
    return {
        "runs": counted,
        "kernel_us": total,
        "lora_us": lora,
        "base_us": total - lora,
        "run_kernel_us": statistics.median(run_total),
        "run_lora_us": statistics.median(run_lora),
        "kernels": kernels,
        "lora_kernels": lora_kernels,
        "lora_ops_us": dict(sorted(lora_ops.items())),
        "op_kernels": dict(sorted(op_kernels.items())),
        "run_us": wall,
    }


QUESTION_OF = {"b1": "single", "b16": "multi", "decode": "generate"}  # a profile key's first word


def profile_specs(args, vocab: int) -> dict[str, tuple]:
    """key: (model, feeds or "decode", adapter, strategy), for the questions ``args`` runs."""
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    b1, b16 = llm_feeds(1, args.seq, vocab=vocab), llm_feeds(16, args.multi_seq, seed=1, vocab=vocab)
    specs = {
        "b1 base": ("base", b1, None, "slots"),
        "b1 slots, adapter off": ("slots", b1, None, "slots"),
        "b1 slots, one adapter": ("slots", b1, "a00", "slots"),
        "b1 merge strategy, adapter off": ("slots", b1, None, "merge"),
        "b1 merge strategy, one adapter": ("slots", b1, "a00", "merge"),
        "b1 merged": ("merged", b1, None, "slots"),
        "b16 base": ("base", b16, None, "slots"),
        "b16 slots, one adapter": ("slots", b16, "a00", "slots"),
        "b16 merge strategy, one adapter": ("slots", b16, "a00", "merge"),
        "b16 multi, shared": ("multi", b16, ["a00"] * 16, "slots"),
        "b16 multi, 16 distinct": ("multi", b16, names, "slots"),
        "b16 multi, none": ("multi", b16, None, "slots"),
        "decode base": ("past_base", "decode", None, "slots"),
        "decode slots, one adapter": ("past_slots", "decode", "a00", "slots"),
        "decode merge strategy, one adapter": ("past_slots", "decode", "a00", "merge"),
        "decode merged": ("past_merged", "decode", None, "slots"),
    }
    return {k: v for k, v in specs.items() if QUESTION_OF[k.split()[0]] in args.questions}


def profile(paths, args, vocab: int) -> dict[str, dict]:
    """One profiling session per variant, all alive at once, their runs interleaved."""
    out_dir = args.cache / "profiles"
    out_dir.mkdir(exist_ok=True)
    for stale in out_dir.glob("*.json"):
        stale.unlink()
    names = [adapter_name(i) for i in range(N_ADAPTERS)]
    specs = profile_specs(args, vocab)
    sessions = {}
    for key, (model, feeds, adapter, strategy) in specs.items():
        prefix = str(out_dir / re.sub(r"\W+", "_", key))
        sess = device_session(paths[model], args.device, strategy=strategy, profile_prefix=prefix)
        wanted = names if model == "multi" else ["a00"] if adapter else []
        source = adapter_files(paths, "past_slots" if model.startswith("past_") else "slots")
        for name in wanted:
            sess.load_adapter(name, source[name])
        if strategy == "merge" and adapter:
            sess.activate(adapter)  # the swap happens here, before any profiled run
        sessions[key] = sess
        if isinstance(feeds, str):
            specs[key] = (model, decode_feeds(sess, args.prompt), adapter, strategy)
    rng = np.random.default_rng(args.seed + 3)
    for key in specs:  # one warm-up run each, skipped when parsing
        _, feeds, adapter, _ = specs[key]
        sessions[key].run(None, feeds, adapter=adapter)
    for _ in range(args.profile_runs):
        for key in rng.permutation(list(specs)):
            _, feeds, adapter, _ = specs[key]
            sessions[key].run(None, feeds, adapter=adapter)
    results = {}
    for key, sess in sessions.items():
        path = sess._session.end_profiling()  # AdapterSession exposes no profiler API
        results[key] = parse_profile(path, skip_runs=1)
        Path(path).unlink()
    sessions.clear()
    gc.collect()
    for stray in out_dir.glob("*.json"):  # merge-strategy sessions' merge sessions profile too
        stray.unlink()
    return results
