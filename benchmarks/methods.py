"""What does each method's unmerged ONNX branch cost on CPU?

As a ratio to the base model and to LoRA at (about) the same trainable-parameter budget.

Model: the Llama-shaped fp32 model of benchmarks/runtime.py (hidden 1024, 4 layers, intermediate
2816, 16 heads, vocab 32000, ~117M parameters, seeded random weights; its builder, its cache),
batch 1, seq 128, ONNX Runtime CPU, default threads. Adapters target q_proj and v_proj of all 4
layers (IA3 also down_proj, as feedforward input scaling). LoRA r=16 sets the budget (262,144
trainable numbers); every other method gets the hyperparameters that bring its trainable count
closest to that (IA3 and VeRA cannot reach it: their counts are fixed by the layer widths).

Each adapter is made with onnx_peft's own tuners (``get_peft_model``), its trainable tensors
perturbed with a seeded RNG so no branch is a no-op, and saved as a PEFT dir. The base is
exported once (``export(task="causal-lm")``) and each adapter inserted into its own slot model
(``insert_adapters``, mode "slots"). Cached in /tmp/onnx_peft_bench_methods (``--cache``):

    adapters/<METHOD>/     PEFT dir (+ torch_logits.npy: the PyTorch PeftModel's logits)
    base/model.onnx        the plain export
    slots_<METHOD>/        model.onnx + adapters/<method>.onnx_adapter

One interleaved run (variants in a random order per round, median of ``--runs`` each) over the
base, the LoRA slot model with the adapter off, and every method's slot model with its adapter
active. Then the ORT profiler, all profiled sessions alive at once with interleaved runs: per
variant the kernel time (per node the median over runs, summed) and the share of it spent in
branch nodes (``<module>/adapter/<suffix>``, graph/branch.py).

    python benchmarks/methods.py            # ~8 min on 2 cores the first time (builds, exports), ~6 after
    python benchmarks/methods.py --quick    # few runs, no BENCHMARKS.md update
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime as rt  # noqa: E402  (benchmarks/runtime.py: builder, feeds, profiler)
from common import ROOT, interleaved, log, med, session, versions, write_section  # noqa: E402

SECTION = "## Methods: unmerged branch cost (benchmarks/methods.py)"
QV = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Spec:
    key: str          # PEFT type (adapter name = key.lower())
    label: str        # table row
    hyper: str        # hyperparameters, as written in the table
    config: str       # onnx_peft config class
    kwargs: dict[str, Any]


# Budget: LoRA r=16 on q_proj + v_proj (1024 -> 1024) x 4 layers = 8 x 16 x (1024 + 1024) = 262,144.
SPECS = [
    Spec("LORA", "LoRA", "r=16, alpha=32", "LoraConfig", dict(r=16, lora_alpha=32)),
    Spec("DORA", "LoRA + DoRA", "r=16, alpha=32, use_dora", "LoraConfig",
         dict(r=16, lora_alpha=32, use_dora=True)),
    Spec("IA3", "IA3", "q/v out, down_proj in (feedforward)", "IA3Config",
         dict(target_modules=QV + ["down_proj"], feedforward_modules=["down_proj"])),
    Spec("LOHA", "LoHa", "r=8, alpha=8", "LoHaConfig", dict(r=8, alpha=8)),
    Spec("LOKR", "LoKr", "r=64, alpha=64, decompose_factor=4", "LoKrConfig",
         dict(r=64, alpha=64, decompose_factor=4)),
    Spec("OFT", "OFT", "oft_block_size=64", "OFTConfig", dict(oft_block_size=64)),
    Spec("BOFT", "BOFT", "boft_block_size=32", "BOFTConfig", dict(boft_block_size=32)),
    Spec("HRA", "HRA", "r=32", "HRAConfig", dict(r=32)),
    Spec("VERA", "VeRA", "r=256 (PEFT default)", "VeraConfig", dict(r=256)),
    Spec("ADALORA", "AdaLoRA", "init_r=target_r=16", "AdaLoraConfig",
         dict(init_r=16, target_r=16, total_step=100)),
    Spec("FOURIERFT", "FourierFT", "n_frequency=32768", "FourierFTConfig", dict(n_frequency=32768)),
    Spec("MISS", "MiSS", "r=32", "MissConfig", dict(r=32)),
]
BASE, OFF = "base", "LoRA slot model, adapter off"


# --------------------------------------------------------------------------------------------
# Building (cached)
# --------------------------------------------------------------------------------------------


def build_adapters(base_dir: Path, cache: Path, feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """One PEFT dir per method (perturbed, seeded), with its trainable count and torch logits."""
    root = cache / "adapters"
    info_path = root / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    todo = [s for s in SPECS if s.key not in info or not (root / s.key / "adapter_config.json").is_file()]
    if not todo:
        return info
    import torch
    from transformers import LlamaForCausalLM

    import onnx_peft

    torch.set_num_threads(os.cpu_count() or 1)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    for spec in todo:
        log(f"adapter {spec.key}: {spec.config}({spec.hyper})")
        kwargs = {"target_modules": QV, **spec.kwargs}
        config = getattr(onnx_peft, spec.config)(**kwargs)
        peft = onnx_peft.get_peft_model(copy.deepcopy(base), config).eval()
        generator = torch.Generator().manual_seed(2000 + SPECS.index(spec))
        with torch.no_grad():
            for _, param in sorted(peft.named_parameters()):
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        trainable, _ = peft.get_nb_trainable_parameters()
        with torch.no_grad():
            logits = peft(input_ids=ids, attention_mask=mask).logits.float().numpy()
        target = root / spec.key
        peft.save_pretrained(target)
        np.save(target / "torch_logits.npy", logits)
        info[spec.key] = {"trainable": int(trainable)}
        del peft
        gc.collect()
    root.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def prepare(args, feeds) -> tuple[dict[str, Path], dict[str, dict]]:
    """The base export and one slot model per method (each step skipped when its file exists)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    base_dir, _ = rt.build_hf(args.hf_cache)  # runtime.py's model (and cache): same seed, same shapes
    info = build_adapters(base_dir, args.cache, feeds)
    from onnx_peft import export, insert_adapters

    paths = {BASE: args.cache / "base" / "model.onnx"}
    if not paths[BASE].is_file():
        log("exporting the base (causal-lm)")
        started = time.perf_counter()
        export(base_dir, args.cache / "base", task="causal-lm", quiet=True)
        log(f"  done in {time.perf_counter() - started:.0f} s")
    for spec in SPECS:
        target = args.cache / f"slots_{spec.key}" / "model.onnx"
        if not target.is_file():
            log(f"insert_adapters: {spec.key}")
            started = time.perf_counter()
            insert_adapters(paths[BASE], {spec.key.lower(): args.cache / "adapters" / spec.key},
                            target.parent)
            log(f"  done in {time.perf_counter() - started:.0f} s")
        paths[spec.key] = target
    return paths, info


def adapter_file(paths: dict[str, Path], key: str) -> Path:
    return paths[key].parent / "adapters" / f"{key.lower()}.onnx_adapter"


# --------------------------------------------------------------------------------------------
# Static figures: forms, branch MACs
# --------------------------------------------------------------------------------------------


def base_linear_macs(path: Path) -> int:
    """Multiply-adds per token of the base's MatMul/Gemm nodes with a constant weight."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return sum(
        int(np.prod(dims[n.input[1]]))
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in dims and len(dims[n.input[1]]) == 2
    )


def linear_nodes(path: Path) -> dict[str, str]:
    """Module path -> name of its Linear's node (exporter names: the same in every slot model)."""
    from onnx_peft.graph.io import load_model
    from onnx_peft.graph.modules import find_linear_sites

    return {module: site.node.name for module, site in find_linear_sites(load_model(path)).items()}


def branch_static(sess, file: Path) -> tuple[list[str], int, int, list[str]]:
    """(forms filled by the adapter, branch multiply-adds per token, adapter-file numbers, modules)."""
    from onnx_peft.formats import load_adapter_file

    tensors, _ = load_adapter_file(file)
    slots = {s.name: s for s in sess.contract.slots}
    forms, macs, modules = [], 0, set()
    for name, array in tensors.items():
        form = slots[name].method
        modules.add(slots[name].module)
        if form not in forms:
            forms.append(form)
        shape = array.shape
        if form == "lora" or form == "dense":   # [in, r] / [r, out] / [d, out]: one MatMul each
            macs += int(np.prod(shape))
        elif form == "rotate_in":               # [n, b, b]: n blocks of b x b per token
            macs += int(np.prod(shape))
    return forms, macs, sum(int(a.size) for a in tensors.values()), sorted(modules)


# --------------------------------------------------------------------------------------------
# Timing and profiling
# --------------------------------------------------------------------------------------------


def variant_specs(paths) -> dict[str, tuple[Path, str | None, Path | None]]:
    """name -> (model, adapter name, adapter file)."""
    specs: dict[str, tuple[Path, str | None, Path | None]] = {
        BASE: (paths[BASE], None, None),
        OFF: (paths["LORA"], None, None),
    }
    for s in SPECS:
        specs[s.label] = (paths[s.key], s.key.lower(), adapter_file(paths, s.key))
    return specs


def open_sessions(specs, profile_dir: Path | None = None) -> dict[str, Any]:
    sessions = {}
    for key, (model, name, file) in specs.items():
        prefix = None if profile_dir is None else str(profile_dir / re.sub(r"\W+", "_", key))
        sess = session(model, profile_prefix=prefix)
        if name is not None:
            sess.load_adapter(name, file)
        sessions[key] = sess
    return sessions


def timing(paths, info, args, feeds) -> tuple[dict, dict, dict]:
    specs = variant_specs(paths)
    log(f"opening {len(specs)} sessions")
    sessions = open_sessions(specs)
    static: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    ref = sessions[BASE].run(["logits"], feeds)[0]
    checks[OFF] = {"vs_base": float(np.abs(sessions[OFF].run(["logits"], feeds)[0] - ref).max())}
    for s in SPECS:
        sess = sessions[s.label]
        forms, macs, numbers, modules = branch_static(sess, adapter_file(paths, s.key))
        static[s.label] = {"forms": forms, "macs": macs, "file_numbers": numbers, "modules": modules,
                           "trainable": info[s.key]["trainable"], "hyper": s.hyper}
        out = sess.run(["logits"], feeds, adapter=s.key.lower())[0]
        torch_logits = np.load(paths[s.key].parents[1] / "adapters" / s.key / "torch_logits.npy")
        checks[s.label] = {
            "vs_torch": float(np.abs(out - torch_logits).max()),
            "vs_base": float(np.abs(out - ref).max()),
        }
    variants = {
        key: (lambda sess=sessions[key], name=specs[key][1]: sess.run(["logits"], feeds, adapter=name))
        for key in specs
    }
    log(f"timing: {len(variants)} variants x {args.runs} interleaved runs")
    times = interleaved(variants, args.runs, args.warmup, args.seed, "methods")
    sessions.clear()
    gc.collect()
    return times, static, checks


def profile(paths, args, feeds, static) -> dict[str, dict]:
    """One profiling session per variant, all alive at once, their runs interleaved."""
    linears = linear_nodes(paths[BASE])
    out_dir = args.cache / "profiles"
    out_dir.mkdir(exist_ok=True)
    specs = variant_specs(paths)
    sessions = open_sessions(specs, out_dir)
    rng = np.random.default_rng(args.seed + 1)
    for key, sess in sessions.items():  # one warm-up run each, skipped when parsing
        sess.run(None, feeds, adapter=specs[key][1])
    for _ in range(args.profile_runs):
        for key in rng.permutation(list(specs)):
            sessions[key].run(None, feeds, adapter=specs[key][1])
    results, base_nodes = {}, None
    for key, sess in sessions.items():
        path = sess._session.end_profiling()  # AdapterSession exposes no profiler API
        result = rt.parse_profile(path, skip_runs=1)
        durations: dict[str, list[float]] = {}
        for e in json.loads(Path(path).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                durations.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"])
        nodes = set(durations)
        # the slowest branch nodes (median over all runs, the warm-up included): for digging
        branch = {n: float(np.median(d)) for n, d in durations.items() if rt.LORA_NODE.search(n)}
        result["top_branch_nodes_us"] = dict(sorted(branch.items(), key=lambda kv: -kv[1])[:6])
        # kernel time of the Linears the adapter wraps (q_proj, v_proj, ...), as in this session
        wrapped = [linears[m] for m in static.get(key, {}).get("modules", [])]
        result["wrapped_linear_us"] = float(sum(np.median(durations[n]) for n in wrapped if n in durations))
        result["wrapped_missing"] = [n for n in wrapped if n not in durations]
        if base_nodes is None:  # BASE comes first
            base_nodes = nodes
        # kernels neither in the base nor named as branch nodes: ORT renamed (fused) something
        result["unclassified"] = sorted(n for n in nodes - base_nodes if not rt.LORA_NODE.search(n))
        results[key] = result
        os.remove(path)
    sessions.clear()
    gc.collect()
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def quartile(values: list[float]) -> float:
    return float(np.percentile(values, 25))


def report(args, times, static, checks, prof, base_macs, loads) -> tuple[str, list[str]]:
    base, lora = med(times[BASE]), med(times["LoRA"])
    base_q, lora_q = quartile(times[BASE]), quartile(times["LoRA"])
    kb = prof[BASE]["kernel_us"]
    budget = static["LoRA"]["trainable"]

    def grow(p: dict) -> float:  # 1 + branch / rest, within one session: robust to machine drift
        return 1 + p["lora_us"] / p["base_us"]

    glora = grow(prof["LoRA"])
    lora_per_mac = prof["LoRA"]["lora_us"] / static["LoRA"]["macs"]
    spread = float(np.percentile(times[BASE], 75)) / base_q
    wall = [
        f"Batch 1, seq {args.seq}: {args.runs} interleaved runs per variant; base median {base * 1e3:.1f} ms, lower "
        f"quartile {base_q * 1e3:.1f} ms; linear layers {base_macs / 1e6:.1f}M multiply-adds per token.",
        "",
        "| method | hyperparameters | form(s) | trainable params | x LoRA params | median ms | x base | x LoRA "
        "| lower quartile ms | x base (quartile) | x LoRA (quartile) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kernel = [
        f"ORT profiler, {args.profile_runs} runs per variant; base {kb / 1e3:.1f} ms of kernels per run.",
        "",
        "| method | x base (kernel, 1 + branch/rest) | x LoRA (kernel, same) | x base (kernel, direct) "
        "| branch kernel ms/run | branch kernels/run | branch / its Linears (kernel) | branch MACs % of base "
        "| branch time per MAC x LoRA's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def wall_cells(key: str) -> str:
        t, q = med(times[key]), quartile(times[key])
        return (f"{t * 1e3:.1f} | {t / base:.3f} | {t / lora:.3f} | {q * 1e3:.1f} | {q / base_q:.3f} "
                f"| {q / lora_q:.3f}")

    wall.append(f"| base | | | | | {wall_cells(BASE)} |")
    wall.append(f"| {OFF} | | lora (rank 0) | | | {wall_cells(OFF)} |")
    kernel.append(f"| base | 1.000 | {1 / glora:.4f} | 1.000 | | 0 | | | |")
    p = prof[OFF]
    kernel.append(f"| {OFF} | {grow(p):.4f} | {grow(p) / glora:.4f} | {p['kernel_us'] / kb:.3f} "
                  f"| {p['lora_us'] / 1e3:.2f} | {p['lora_kernels']:.0f} | | 0 | |")
    notes, odd = [], []
    for s in SPECS:
        st, p = static[s.label], prof[s.label]
        params = st["trainable"] / budget
        mark = "" if 0.9 <= params <= 1.1 else " (budget not reachable)"
        mac_pct = 100 * st["macs"] / base_macs
        per_mac = p["lora_us"] / st["macs"] / lora_per_mac if st["macs"] else float("nan")
        own = f"{p['lora_us'] / p['wrapped_linear_us']:.3f}" if p["wrapped_linear_us"] else ""
        wall.append(f"| {s.label} | {st['hyper']} | {' + '.join(st['forms'])} | {st['trainable']:,} "
                    f"| {params:.3f}{mark} | {wall_cells(s.label)} |")
        kernel.append(
            f"| {s.label} | {grow(p):.4f} | {grow(p) / glora:.4f} | {p['kernel_us'] / kb:.3f} | {p['lora_us'] / 1e3:.2f} "
            f"| {p['lora_kernels']:.0f} | {own} | {mac_pct:.2f}% | {'' if np.isnan(per_mac) else f'{per_mac:.2f}'} |"
        )
        top = sorted(p["lora_ops_us"].items(), key=lambda kv: -kv[1])[:3]
        notes.append(f"{s.label}: " + (", ".join(f"{op} {us / 1e3:.2f}" for op, us in top) or "none"))
        if p["wrapped_missing"]:
            odd.append(f"{s.label}: Linear nodes not in the profile: {', '.join(p['wrapped_missing'][:3])}")
        if p["unclassified"]:
            odd.append(f"{s.label}: {len(p['unclassified'])} kernels neither in the base nor named "
                       f"`/adapter/` (ORT fusions?): {', '.join(p['unclassified'][:4])}")
        # branch kernel time out of line with its arithmetic, measured against LoRA's branch
        # (small GEMMs run below the base's GEMM rate, so LoRA, not the base, is the yardstick)
        if st["macs"] and per_mac > 2.5 and p["lora_us"] > 0.01 * kb:
            odd.append(f"{s.label}: branch kernels take {p['lora_us'] / 1e3:.2f} ms/run, {per_mac:.1f}x LoRA's time "
                       f"per multiply-add")
        rest = sum(us for op, us in p["lora_ops_us"].items() if op != "MatMul")
        if rest > 0.02 * kb:
            odd.append(f"{s.label}: the branch's non-MatMul kernels take {rest / 1e3:.2f} ms/run "
                       f"({100 * rest / kb:.1f}% of the base's kernel time)")
    check_text = "; ".join(
        f"{k} vs PyTorch {v['vs_torch']:.1e} (vs base {v['vs_base']:.2f})" if "vs_torch" in v
        else f"{k} vs base {v['vs_base']:.1e}"
        for k, v in checks.items()
    )
    bimodal = (
        [f"Wall times of the base spread from {base_q * 1e3:.0f} ms (lower quartile) to "
         f"{float(np.percentile(times[BASE], 75)) * 1e3:.0f} ms (upper): the machine was intermittently busy, so the "
         "medians fall between a quiet and a busy mode; read the lower quartiles and, above all, the kernel table.", ""]
        if spread > 1.3 else []
    )
    text = "\n".join(
        wall + [""] + bimodal + kernel + [""]
        + ["Branch kernels by op, ms/run (the three largest):", *[f"- {n}" for n in notes], ""]
        + (["Flagged (branch time per multiply-add over 2.5x LoRA's, non-MatMul branch kernels over 2% of the "
             "base, or unclassified kernels):", *[f"- {o}" for o in odd], ""]
           if odd else ["Flagged: nothing (no branch over 2.5x LoRA's time per multiply-add, no non-MatMul "
                        "branch kernels over 2% of the base, no unclassified kernels).", ""])
        + ["Checks, max |logits diff| of each slot model with its adapter active: " + check_text]
    )
    return text, odd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs, no BENCHMARKS.md update")
    parser.add_argument("--runs", type=int, default=40, help="interleaved runs per variant (default 40)")
    parser.add_argument("--profile-runs", type=int, default=15, help="profiled runs per variant (default 15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx_peft_bench_methods"))
    parser.add_argument("--hf-cache", type=Path, default=Path("/tmp/onnx_peft_bench_rt"),
                        help="runtime.py's cache: the HF base model is built (or reused) there")
    parser.add_argument("--prepare-only", action="store_true", help="build and export, then stop")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.profile_runs, args.warmup = 3, 2, 1
        args.no_write = True
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    feeds = rt.llm_feeds(1, args.seq)
    paths, info = prepare(args, feeds)
    if args.prepare_only:
        return 0
    base_macs = base_linear_macs(paths[BASE])
    prepared = time.perf_counter()
    times, static, checks = timing(paths, info, args, feeds)
    log(f"profiler: {args.profile_runs} runs per variant")
    prof = profile(paths, args, feeds, static)
    loads.append(os.getloadavg()[0])
    seconds = time.perf_counter() - started
    text, _ = report(args, times, static, checks, prof, base_macs, loads)
    load = ", ".join(f"{x:.1f}" for x in loads)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average (1 min) at start/end: {load}; "
        f"{versions()}"
    )
    print()
    print(text)
    print(f"\nMachine: {machine}. Took {seconds / 60:.1f} min ({(seconds - prepared + started) / 60:.1f} min "
          "after building/exporting).")
    (args.cache / "last_run.json").write_text(json.dumps(
        {"times": times, "static": static, "checks": checks, "profile": prof, "loads": loads,
         "base_macs": base_macs}, indent=1))
    if args.no_write:
        return 0
    command = "python benchmarks/methods.py" + (
        "" if (args.runs, args.profile_runs, args.seq) == (40, 15, 128)
        else f" --runs {args.runs} --profile-runs {args.profile_runs} --seq {args.seq}"
    )
    section = "\n".join([
        SECTION,
        "",
        "What does each method's unmerged ONNX branch (insert_adapters, mode \"slots\", adapter active) cost on CPU,",
        "against the base model and against LoRA at the same trainable-parameter budget? Llama-shaped fp32 model of",
        "benchmarks/runtime.py (hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000, ~117M params),",
        f"batch 1, seq {args.seq}; adapters on q_proj + v_proj of all 4 layers (IA3 also down_proj, feedforward input",
        "scaling), made with onnx_peft's tuners and perturbed with a seeded RNG; LoRA r=16 sets the budget and each",
        "other method takes the hyperparameters nearest it (IA3 and VeRA cannot reach it: their trainable count is",
        "fixed by the layer widths, about r + out per layer for VeRA). Each method in its own slot model.",
        "What sets the cost is the branch form, not the parameter count: `lora` (LoRA, DoRA, AdaLoRA, HRA, MiSS,",
        "VeRA) costs two rank-r MatMuls, `rotate_in` OFT's small blocks, `ia3_*`/`dora` one Mul; `dense` (LoHa, LoKr,",
        "FourierFT) and BOFT's `rotate_in` (its butterfly solved into one [in, in] block) carry a full matrix per",
        "module, i.e. a second Linear of the same size, whatever the method trains.",
        "",
        "Method: wall ratios from one interleaved run (random order each round; medians and lower quartiles);",
        "kernel ratios from ORT's profiler (per node the median `*_kernel_time`, summed; branch kernels = nodes",
        "named `<module>/adapter/*`), all profiled sessions alive at once with interleaved runs.",
        "- x base (kernel, 1 + branch/rest): branch over non-branch kernel time within the same session (robust to",
        "  the machine's drift; the direct ratio of two sessions' totals is not, on a shared box); x LoRA (kernel,",
        "  same): that over LoRA's.",
        "- branch MACs % of base: the branch's multiply-adds per token (lora A+B, dense D, rotation blocks;",
        "  elementwise forms count 0) over those of the base's linear layers.",
        "- branch / its Linears: branch kernel time over that of the Linears it wraps (q_proj and v_proj x 4, IA3",
        "  also down_proj) in the same session.",
        "- branch time per MAC x LoRA's: (branch kernel time / branch MACs) over LoRA's (1 = the branch runs its",
        "  arithmetic as fast as LoRA's two small MatMuls do).",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine}. Run took {seconds / 60:.1f} min.",
        "",
        *([f"The machine was shared (load average above its {os.cpu_count()} cores): wall-clock ratios move by "
           "10% and more between runs, so judge the methods by the kernel-time columns.", ""]
          if max(loads) > (os.cpu_count() or 1) else []),
        text,
        "",
    ])
    write_section(SECTION, section, args.output)
    log(f"wrote {SECTION!r} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
