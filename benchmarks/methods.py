"""What does each method's unmerged ONNX branch cost on CPU?

As a ratio to the base model and to LoRA at (about) the same trainable-parameter budget.

Model: the Llama-shaped fp32 model of benchmarks/runtime.py (hidden 1024, 4 layers, intermediate
2816, 16 heads, vocab 32000, ~117M parameters, seeded random weights; its builder, its cache),
batch 1, seq 128, ONNX Runtime CPU, default threads, intra-op spinning off (``common.session(...,
spinning=False)``: with many sessions interleaved on few cores, one session's spinning pool slows
the next one's run). Adapters target q_proj and v_proj of all 4 layers (IA3 also down_proj, as
feedforward input scaling). LoRA r=16 sets the budget (262,144 trainable numbers); every other
method gets the hyperparameters that bring its trainable count closest to that where its
hyperparameters can (IA3, VeRA and RoAd cannot: their counts are fixed by the layer widths).
Each method is compared with the LoRA adapter whose r brings LoRA's trainable count closest to
the method's (LoRA r=1, r=2, ... are built for that as needed: ``lora_ref``).

Each adapter is made with onnx_peft's own tuners (``get_peft_model``), its trainable tensors
perturbed with a seeded RNG so no branch is a no-op, and saved as a PEFT dir. The base is
exported once (``export(task="causal-lm")``) and each adapter inserted into its own slot model
(``insert_adapters``, mode "slots"). Methods whose slot model has per-row banks also go through
the MultiAdapter pass (benchmarks/methods_rows.py). Cached in /tmp/onnx_peft_bench_methods (``--cache``):

    adapters/<METHOD>/     PEFT dir (+ torch_logits.npy: the PyTorch PeftModel's logits)
    base/model.onnx        the plain export
    slots_<METHOD>/        model.onnx + adapters/<method>.onnx_adapter
    multi_<METHOD>/        slots_<METHOD> through the MultiAdapter pass (per-row banks)

One interleaved run (variants in a random order per round, median of ``--runs`` each) over the
base, the LoRA slot model with the adapter off, and every method's slot model with its adapter
active. Then the ORT profiler, all profiled sessions alive at once with interleaved runs: per
variant the kernel time (per node the median over runs, summed) and the share of it spent in
branch nodes (``<module>/adapter/<suffix>``, graph/branch.py). Then the per-row run
(methods_rows.py): batch 4, each row its own adapter, for the methods with per-row banks.

    python benchmarks/methods.py            # ~15 min on 2 cores the first time (builds, exports), ~5 after
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
import methods_rows as mr  # noqa: E402  (the per-row run)
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
    rows: bool = False        # also in the per-row run (MultiAdapter; refused forms are reported)
    needs: str | None = None  # a method name that must be registered (skipped otherwise)


# Budget: LoRA r=16 on q_proj + v_proj (1024 -> 1024) x 4 layers = 8 x 16 x (1024 + 1024) = 262,144.
SPECS = [
    Spec("LORA", "LoRA", "r=16, alpha=32", "LoraConfig", dict(r=16, lora_alpha=32), rows=True),
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
    # the newer methods (issue 14): budget where the hyperparameters reach it
    *(Spec(f"ROAD_{v}", f"RoAd road_{v}", f"variant=road_{v}, group_size=64", "RoadConfig",
           dict(variant=f"road_{v}"), rows=True) for v in (1, 2, 4)),
    Spec("DELORA", "DeLoRA", "r=16, delora_lambda=15", "DeloraConfig", dict(r=16), rows=True),
    Spec("VBLORA", "VB-LoRA", "r=12, num_vectors=256, vector_length=256, topk=2", "VBLoRAConfig",
         dict(r=12, num_vectors=256, vector_length=256, topk=2), rows=True),
    Spec("RANDLORA", "RandLoRA", "r=32, randlora_alpha=640 (PEFT defaults)", "RandLoraConfig", dict(r=32),
         rows=True),
    Spec("SHIRA", "SHiRA", "r=16, mask_type=random", "ShiraConfig", dict(r=16, random_seed=0), rows=True),
    Spec("C3A", "C3A", "block_size=32", "C3AConfig", dict(block_size=32), rows=True),
    Spec("WAVEFT", "WaveFT", "n_frequency=32768, db1", "WaveFTConfig", dict(n_frequency=32768), rows=True),
    Spec("OSF", "OSF", "effective_rank=1008 (16 directions trained)", "OSFConfig", dict(effective_rank=1008),
         rows=True, needs="osf"),
]
BASE, OFF = "base", "LoRA slot model, adapter off"
RUNS = (30, 20)  # default --runs, --row-runs: the whole run in ~5 min on 2 cores (once built)
LORA_R = 16  # SPECS[0]


def lora_ref(r: int) -> Spec:
    """The LoRA spec at rank ``r`` (SPECS[0] at r=16), alpha = 2 r as there."""
    if r == LORA_R:
        return SPECS[0]
    return Spec(f"LORA_R{r}", f"LoRA r={r}", f"r={r}, alpha={2 * r}", "LoraConfig", dict(r=r, lora_alpha=2 * r),
                rows=True)


def nearest_rank(trainable: int, per_rank: int) -> int:
    """LoRA's r whose trainable count (``per_rank`` r) is closest to ``trainable`` (ties: the lower)."""
    low = max(1, trainable // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - trainable), r))


# --------------------------------------------------------------------------------------------
# Building (cached)
# --------------------------------------------------------------------------------------------


def build_adapters(base_dir: Path, cache: Path, feeds: dict[str, np.ndarray], specs: list[Spec]) -> dict[str, dict]:
    """One PEFT dir per method (perturbed, seeded), with its trainable count and torch logits."""
    root = cache / "adapters"
    info_path = root / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    todo = [s for s in specs if s.key not in info or not (root / s.key / "adapter_config.json").is_file()]
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
        seed = 2000 + SPECS.index(spec) if spec in SPECS else 3000 + spec.kwargs["r"]
        generator = torch.Generator().manual_seed(seed)
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
    """The base export and one slot model per method (each step skipped when its file exists).

    Sets ``args.specs`` (the table's rows: LoRA, the LoRA references, then the methods) and
    ``args.match`` (label -> the label of LoRA at the same budget)."""
    from onnx_peft.methods.base import method_names

    args.cache.mkdir(parents=True, exist_ok=True)
    base_dir, _ = rt.build_hf(args.hf_cache)  # runtime.py's model (and cache): same seed, same shapes
    registered = set(method_names())
    specs = [s for s in SPECS if s.needs is None or s.needs in registered]
    args.skipped = [f"{s.label}: `{s.needs}` is not registered" for s in SPECS if s not in specs]
    info = build_adapters(base_dir, args.cache, feeds, specs)
    per_rank = info["LORA"]["trainable"] // LORA_R
    ranks = {s.label: nearest_rank(info[s.key]["trainable"], per_rank) for s in specs}
    refs = [lora_ref(r) for r in sorted(set(ranks.values())) if r != LORA_R]
    info = build_adapters(base_dir, args.cache, feeds, refs)
    args.specs = [SPECS[0], *refs, *specs[1:]]
    args.match = {**{s.label: lora_ref(r).label for s, r in zip(specs, ranks.values())},
                  **{r.label: r.label for r in refs}}
    from onnx_peft import export, insert_adapters

    paths = {BASE: args.cache / "base" / "model.onnx"}
    if not paths[BASE].is_file():
        log("exporting the base (causal-lm)")
        started = time.perf_counter()
        export(base_dir, args.cache / "base", task="causal-lm", quiet=True)
        log(f"  done in {time.perf_counter() - started:.0f} s")
    for spec in args.specs:
        target = args.cache / f"slots_{spec.key}" / "model.onnx"
        if not target.is_file():
            log(f"insert_adapters: {spec.key}")
            started = time.perf_counter()
            insert_adapters(paths[BASE], {spec.key.lower(): args.cache / "adapters" / spec.key},
                            target.parent)
            log(f"  done in {time.perf_counter() - started:.0f} s")
        paths[spec.key] = target
    args.multi = mr.build_multi(paths, [s for s in args.specs if s.rows], args.cache)
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


def variant_specs(paths, specs: list[Spec]) -> dict[str, tuple[Path, str | None, Path | None]]:
    """name -> (model, adapter name, adapter file)."""
    variants: dict[str, tuple[Path, str | None, Path | None]] = {
        BASE: (paths[BASE], None, None),
        OFF: (paths["LORA"], None, None),
    }
    for s in specs:
        variants[s.label] = (paths[s.key], s.key.lower(), adapter_file(paths, s.key))
    return variants


def open_sessions(specs, profile_dir: Path | None = None) -> dict[str, Any]:
    sessions = {}
    for key, (model, name, file) in specs.items():
        prefix = None if profile_dir is None else str(profile_dir / re.sub(r"\W+", "_", key))
        sess = session(model, profile_prefix=prefix, spinning=False)
        if name is not None:
            sess.load_adapter(name, file)
        sessions[key] = sess
    return sessions


def measure(paths, info, args, feeds) -> tuple[dict, dict, dict, dict]:
    """One profiled session per variant, all alive at once: checks, then one interleaved run.

    The wall times and the kernel times come from the same runs: the profiler adds a few
    microseconds per node (some 700 nodes a run, ~160 ms), well under 1%, and as much to the base
    as to a branch-heavy variant within a hundred nodes. Returns (times, static, checks, profile).
    """
    specs = variant_specs(paths, args.specs)
    out_dir = args.cache / "profiles"
    out_dir.mkdir(exist_ok=True)
    log(f"opening {len(specs)} sessions (profiling, spinning off)")
    sessions = open_sessions(specs, out_dir)
    before = dict.fromkeys(specs, 1 + args.warmup)  # runs ahead of the timed ones, left out of the profile
    static: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    ref = sessions[BASE].run(["logits"], feeds)[0]
    checks[OFF] = {"vs_base": float(np.abs(sessions[OFF].run(["logits"], feeds)[0] - ref).max())}
    row_feeds = rt.llm_feeds(mr.BATCH, mr.SEQ, seed=1)
    args.row_refs = {}  # label -> the slot model's batch-4 logits, the per-row run's reference
    for s in args.specs:
        sess = sessions[s.label]
        if s.label in args.multi and not isinstance(args.multi[s.label], str):
            args.row_refs[s.label] = sess.run(["logits"], row_feeds, adapter=s.key.lower())[0]
            before[s.label] += 1
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
    log("parsing the profiles")
    prof = parse_profiles(sessions, before, linear_nodes(paths[BASE]), static)
    sessions.clear()
    gc.collect()
    return times, static, checks, prof


def parse_profiles(sessions: dict[str, Any], before: dict[str, int], linears: dict[str, str],
                   static: dict[str, dict]) -> dict[str, dict]:
    """Per variant: rt.parse_profile over the timed runs, plus the wrapped Linears' kernel time."""
    results, base_nodes = {}, None
    for key, sess in sessions.items():
        path = sess._session.end_profiling()  # AdapterSession exposes no profiler API
        result = rt.parse_profile(path, skip_runs=before[key])
        durations: dict[str, list[float]] = {}
        for e in json.loads(Path(path).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                durations.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"])
        nodes = set(durations)
        # the slowest branch nodes (median over all runs, the untimed ones included): for digging
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
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def quartile(values: list[float]) -> float:
    return float(np.percentile(values, 25))


def report(args, times, static, checks, prof, base_macs, loads) -> tuple[str, list[str]]:
    base, lora = med(times[BASE]), med(times["LoRA"])
    base_q = quartile(times[BASE])
    kb = prof[BASE]["kernel_us"]

    def grow(p: dict) -> float:  # 1 + branch / rest, within one session: robust to machine drift
        return 1 + p["lora_us"] / p["base_us"]

    glora = grow(prof["LoRA"])
    lora_per_mac = prof["LoRA"]["lora_us"] / static["LoRA"]["macs"]
    spread = float(np.percentile(times[BASE], 75)) / base_q
    wall = [
        f"Batch 1, seq {args.seq}: {args.runs} interleaved runs per variant; base median {base * 1e3:.1f} ms, lower "
        f"quartile {base_q * 1e3:.1f} ms; linear layers {base_macs / 1e6:.1f}M multiply-adds per token.",
        "",
        "| method | hyperparameters | form(s) | trainable params | LoRA at the same budget | median ms | x base "
        "| x LoRA (same budget) | x LoRA r=16 | lower quartile ms | x base (quartile) | x LoRA same budget (quartile) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kernel = [
        f"ORT profiler, the same {args.runs} runs per variant; base {kb / 1e3:.1f} ms of kernels per run.",
        "",
        "| method | x base (kernel, 1 + branch/rest) | x LoRA same budget (kernel, same) | x base (kernel, direct) "
        "| branch kernel ms/run | branch kernels/run | branch / its Linears (kernel) | branch MACs % of base "
        "| branch time per MAC x LoRA r=16's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def wall_cells(key: str, ref: str) -> str:
        t, q = med(times[key]), quartile(times[key])
        return (f"{t * 1e3:.1f} | {t / base:.3f} | {t / med(times[ref]):.3f} | {t / lora:.3f} | {q * 1e3:.1f} "
                f"| {q / base_q:.3f} | {q / quartile(times[ref]):.3f}")

    wall.append(f"| base | | | | | {wall_cells(BASE, 'LoRA')} |")
    wall.append(f"| {OFF} | | lora (rank 0) | | | {wall_cells(OFF, 'LoRA')} |")
    kernel.append(f"| base | 1.000 | {1 / glora:.4f} | 1.000 | | 0 | | | |")
    p = prof[OFF]
    kernel.append(f"| {OFF} | {grow(p):.4f} | {grow(p) / glora:.4f} | {p['kernel_us'] / kb:.3f} "
                  f"| {p['lora_us'] / 1e3:.2f} | {p['lora_kernels']:.0f} | | 0 | |")
    notes, odd = [], []
    for s in args.specs:
        st, p, ref = static[s.label], prof[s.label], args.match[s.label]
        mac_pct = 100 * st["macs"] / base_macs
        per_mac = p["lora_us"] / st["macs"] / lora_per_mac if st["macs"] else float("nan")
        own = f"{p['lora_us'] / p['wrapped_linear_us']:.3f}" if p["wrapped_linear_us"] else ""
        same = "itself" if ref == s.label else f"{ref} ({static[ref]['trainable'] / st['trainable']:.2f}x the params)"
        wall.append(f"| {s.label} | {st['hyper']} | {' + '.join(st['forms'])} | {st['trainable']:,} "
                    f"| {same} | {wall_cells(s.label, ref)} |")
        kernel.append(
            f"| {s.label} | {grow(p):.4f} | {grow(p) / grow(prof[ref]):.4f} | {p['kernel_us'] / kb:.3f} "
            f"| {p['lora_us'] / 1e3:.2f} | {p['lora_kernels']:.0f} | {own} | {mac_pct:.2f}% "
            f"| {'' if np.isnan(per_mac) else f'{per_mac:.2f}'} |"
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
    parser.add_argument("--runs", type=int, default=RUNS[0], help=f"interleaved runs per variant (default {RUNS[0]})")
    parser.add_argument("--row-runs", type=int, default=RUNS[1],
                        help=f"per-row (batch {mr.BATCH}) runs per variant (default {RUNS[1]})")
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
        args.runs, args.row_runs, args.warmup = 3, 2, 1
        args.no_write = True
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    feeds = rt.llm_feeds(1, args.seq)
    paths, info = prepare(args, feeds)
    if args.prepare_only:
        return 0
    base_macs = base_linear_macs(paths[BASE])
    prepared = time.perf_counter()
    times, static, checks, prof = measure(paths, info, args, feeds)
    row_times, row_checks = mr.time_rows(paths, args, adapter_file)
    loads.append(os.getloadavg()[0])
    seconds = time.perf_counter() - started
    text, _ = report(args, times, static, checks, prof, base_macs, loads)
    text += "\n\n" + mr.rows_report(args, row_times, row_checks, static)
    if args.skipped:
        text += "\n\nSkipped: " + "; ".join(args.skipped)
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
         "base_macs": base_macs, "row_times": row_times, "row_checks": row_checks, "match": args.match,
         "multi": {k: str(v) for k, v in args.multi.items()}}, indent=1))
    if args.no_write:
        return 0
    command = "python benchmarks/methods.py" + (
        "" if (args.runs, args.row_runs, args.seq) == (*RUNS, 128)
        else f" --runs {args.runs} --row-runs {args.row_runs} --seq {args.seq}"
    )
    section = "\n".join([
        SECTION,
        "",
        "What does each method's unmerged ONNX branch (insert_adapters, mode \"slots\", adapter active) cost on CPU,",
        "against the base model and against LoRA at the same trainable-parameter budget? Llama-shaped fp32 model of",
        "benchmarks/runtime.py (hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000, ~117M params),",
        f"batch 1, seq {args.seq}; adapters on q_proj + v_proj of all 4 layers (IA3 also down_proj, feedforward input",
        "scaling), made with onnx_peft's tuners and perturbed with a seeded RNG; LoRA r=16 sets the budget and each",
        "other method takes the hyperparameters nearest it where they can reach it (IA3, VeRA and RoAd cannot: their",
        "trainable count is fixed by the layer widths). Each method is set against LoRA at the same budget: the LoRA",
        "adapter whose r brings its trainable count closest to the method's (r=1 and r=2 are built for IA3, VeRA and",
        "RoAd; r=16 for the rest). Each method in its own slot model; every session has ORT's intra-op spinning off",
        "(`common.session(..., spinning=False)`: with this many sessions interleaved on 2 cores, a spinning pool left",
        "by one session's run slows the next session's run, see benchmarks/prompt.py).",
        "What sets the cost is the branch form, not the parameter count: `lora` (LoRA, DoRA, AdaLoRA, HRA, MiSS,",
        "VeRA, DeLoRA, VB-LoRA, OSF at rank 2 x its trained directions) costs two rank-r MatMuls, `rotate_in` OFT's",
        "small blocks, `rotate_out` (RoAd) a few elementwise ops on the Linear's output, `ia3_*`/`dora` one Mul;",
        "`dense` (LoHa, LoKr, FourierFT, SHiRA, C3A, WaveFT) and BOFT's `rotate_in` (its butterfly solved into one",
        "[in, in] block) carry a full matrix per module, i.e. a second Linear of the same size, whatever the method",
        "trains; RandLoRA's `lora` slots are full rank (r x ceil(1024 / r) = 1024), two Linears' worth.",
        "",
        "Method: every variant in its own profiled session, all alive at once; one interleaved run (random order each",
        "round) gives the wall ratios (medians and lower quartiles) and, from ORT's profiler over the same runs, the",
        "kernel ratios (per node the median `*_kernel_time`, summed; branch kernels = nodes named",
        "`<module>/adapter/*`). The profiler costs a few microseconds per node, alike for every variant.",
        "- x base (kernel, 1 + branch/rest): branch over non-branch kernel time within the same session (robust to",
        "  the machine's drift; the direct ratio of two sessions' totals is not, on a shared box); x LoRA same budget",
        "  (kernel, same): that over the matched LoRA's.",
        "- branch MACs % of base: the branch's multiply-adds per token (lora A+B, dense D, rotation blocks;",
        "  elementwise forms count 0) over those of the base's linear layers.",
        "- branch / its Linears: branch kernel time over that of the Linears it wraps (q_proj and v_proj x 4, IA3",
        "  also down_proj) in the same session.",
        "- branch time per MAC x LoRA r=16's: (branch kernel time / branch MACs) over LoRA r=16's (1 = the branch runs",
        "  its arithmetic as fast as LoRA's two small MatMuls do).",
        "- Per row: the methods with per-row banks through the MultiAdapter pass, batch 4 x seq 32 (the same 128",
        "  tokens), each row its own adapter, against the base and LoRA's per-row banks at the same budget; the",
        "  `dense` methods are refused by the pass (merge them) and listed with its message.",
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
