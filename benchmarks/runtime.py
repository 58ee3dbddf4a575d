"""What do adapters cost at inference time in ONNX Runtime (CPU or CUDA)?

A Llama-shaped model (``--shape``: bench = hidden 1024, 4 layers, ~117M params, the CPU model;
gpu = hidden 2048, 6 layers, vocab 4096; 1b = TinyLlama-1.1B's shape, GQA; runtime_models.py),
fp32 or fp16 (``--dtype``), LoRA r=16 (alpha 32) on all 7 projections, 16 PEFT adapter dirs with
random non-zero A and B. Exported once and cached in ``--cache``/<shape>_<dtype>/:

    base/          plain export, no slots                    (task causal-lm)
    slots/         mode="inputs": optional slot inputs + adapters/*.onnx_adapter
    merged/        mode="merged" with adapter a00
    multi/         slots/ through the MultiAdapter pass (banks + adapter_ids)
    past_*/        base, slots, merged for task causal-lm-with-past (generation)

Sessions are AdapterSessions on ``--device`` (fp32 on CUDA without TF32). Questions
(``--questions``), each answered by ratios from ONE interleaved run (variants in a random order
per round, median of ``--runs`` runs each), so drift of the shared machine hits all alike
(runtime_questions.py):

1. batch 1, seq 128: base / slots, no adapter / slots, one adapter / slots, switching between two
   adapters every run / strategy "merge" with no adapter, with one adapter active, switching
   every run, and its swap alone (``activate()`` alternating two adapters) / merged export / a new
   session per adapter switch.
2. batch 16 (seq 32 by default, ``--multi-seq``): base / slot model with one adapter / strategy
   merge with one adapter / MultiAdapter with one shared adapter, 16 distinct adapters, none.
3. greedy generation, prompt 16, 32 new tokens: base / slots + adapter / strategy merge / merged.

Then the ORT profiler (runtime_profile.py): kernel time and kernels per run for each variant,
the share of adapter-branch kernels, and whether strategy merge launches exactly the base's
kernels. A run writes its shape+dtype's part of BENCHMARKS.md's section for its device.

    python benchmarks/runtime.py            # 5-8 min on 2 cores, +1.5 min of exports the first time
    python benchmarks/runtime.py --quick    # fewer runs, no BENCHMARKS.md update
    python benchmarks/runtime.py --device cuda --dtype fp16 --shape gpu   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from common import ROOT, cuda_available, gpu_name, log, versions, write_section
from runtime_models import SHAPES, build_hf, llm_feeds  # noqa: F401  (other benchmarks use rt.build_hf, rt.llm_feeds)
from runtime_profile import LORA_NODE, parse_profile, profile  # noqa: F401  (and rt.parse_profile, rt.LORA_NODE)

SECTIONS = {
    "cpu": "## Runtime (benchmarks/runtime.py)",
    "cuda": "## Runtime on CUDA (benchmarks/runtime.py --device cuda)",
}
QUESTIONS = ("single", "multi", "generate")
METHOD = [
    "LoRA r=16 (alpha 32) on all 7 projections, 16 random adapters; AdapterSession on the section's provider,",
    "default threads. Method: wall-clock ratios come from one interleaved run per table (random order each round,",
    "medians); kernel-time ratios from ORT's profiler (enable_profiling; per node the median `*_kernel_time` over",
    "the runs, summed; adapter kernels = nodes our passes add: `<module>/adapter/*` (branch forms), `<bank>/Gather`,",
    "`<module>/multi_adapter/*`), all profiled sessions alive at once with interleaved runs. Strategy merge =",
    '`AdapterSession(slot model, strategy="merge")`: the base graph, the active adapter folded into the weights on',
    "swap. Each part below is one shape and dtype, written by the command it shows.",
]
CUDA_NOTE = ("On CUDA a node's profiled time is ORT's host-side time (kernels launch asynchronously): judge time "
             "by wall clock, and use the profiler for kernel counts.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ORT provider (default cpu)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="exported dtype (default fp32)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="bench", help="model shape (default bench)")
    parser.add_argument("--questions", default=",".join(QUESTIONS),
                        help=f"comma-separated subset of {','.join(QUESTIONS)} (default all; exports only their models)")
    parser.add_argument("--no-profile", action="store_true", help="skip the ORT profiler part")
    parser.add_argument("--quick", action="store_true", help="few runs, no BENCHMARKS.md update")
    parser.add_argument("--runs", type=int, default=30, help="batch-1 runs per variant (default 30)")
    parser.add_argument("--multi-runs", type=int, default=30, help="batch-16 runs per variant (default 30)")
    parser.add_argument("--gen-runs", type=int, default=15, help="generate() calls per variant (default 15)")
    parser.add_argument("--profile-runs", type=int, default=10, help="profiled runs per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--multi-seq", type=int, default=32, help="sequence length of the batch-16 runs (default 32)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--no-new-session", action="store_true", help="skip the new-session-per-switch variant")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx_peft_bench_rt"),
                        help="cache root; models go to CACHE/<shape>_<dtype>/")
    parser.add_argument("--prepare-only", action="store_true", help="export the models and stop")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    unknown = sorted(set(args.questions) - set(QUESTIONS))
    if unknown or not args.questions:
        parser.error(f"--questions takes a subset of {','.join(QUESTIONS)}; got {','.join(unknown) or 'none'}")
    if args.quick:
        args.runs, args.multi_runs, args.gen_runs, args.profile_runs, args.warmup = 5, 3, 2, 2, 1
        args.no_write = True
    args.cache = args.cache / f"{args.shape}_{args.dtype}"
    return args


def machine_line(args, loads: list[float]) -> str:
    load = ", ".join(f"{x:.1f}" for x in loads)
    date = time.strftime("%Y-%m-%d")
    if args.device == "cuda":
        return (f"GPU {gpu_name()}, ONNX Runtime CUDAExecutionProvider (fp32 without TF32), {os.cpu_count()} CPU "
                f"cores, load average (1 min) at start/end: {load}; {versions()}; {date}")
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, ONNX Runtime CPUExecutionProvider; load average "
            f"(1 min) at start/end: {load}; {versions()}; {date}")


def write_part(section: str, title: str, body: str, path: Path) -> None:
    """Replace (or add) the ``### title`` part of ``section`` in BENCHMARKS.md; the section's other
    parts (other shapes and dtypes) stay as they are."""
    old = path.read_text() if path.exists() else ""
    found = re.search(rf"^{re.escape(section)}\n(.*?)(?=^## |\Z)", old, re.S | re.M)
    parts: dict[str, str] = {}
    if found:
        for chunk in re.split(r"^(?=### )", found.group(1), flags=re.M)[1:]:
            head, _, rest = chunk.partition("\n")
            parts[head] = rest.strip("\n")
    parts[f"### {title}"] = body.strip("\n")
    text = "\n".join([section, "", *METHOD, "", *(f"{head}\n\n{rest}\n" for head, rest in parts.items())])
    if not found:  # a new device section goes right after the other runtime section, when there is one
        for sibling in SECTIONS.values():
            after = re.search(rf"^{re.escape(sibling)}\n.*?(?=^## |\Z)", old, re.S | re.M)
            if sibling != section and after:
                old = old[: after.end()].rstrip("\n") + "\n\n" + section + "\n\n" + old[after.end():]
                path.write_text(old)
                break
    write_section(section, text, path)


def section_body(args, text: str, loads: list[float], seconds: float) -> str:
    shape = SHAPES[args.shape]
    shared = max(loads) > (os.cpu_count() or 1)
    return "\n".join([
        f"{shape.describe(args.dtype)}; device {args.device}.",
        "",
        "```",
        shlex.join(["python", "benchmarks/runtime.py", *sys.argv[1:]]),
        "```",
        "",
        f"Machine: {machine_line(args, loads)}. Run took {seconds / 60:.1f} min.",
        "",
        *([CUDA_NOTE, ""] if args.device == "cuda" else []),
        *([f"The machine was shared (load average above its {os.cpu_count()} cores): wall-clock ratios here move by "
           "10-15% between runs, so judge the goals by the kernel-time figures.", ""] if shared else []),
        text,
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not cuda_available():
        print("runtime.py: --device cuda needs onnxruntime with CUDAExecutionProvider (pip install onnxruntime-gpu "
              "on a CUDA machine); this onnxruntime has none", file=sys.stderr)
        return 2
    from runtime_models import prepare
    from runtime_questions import question_generate, question_multi, question_single
    from runtime_report import report

    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    paths = prepare(args.cache, args.shape, args.dtype, args.questions)
    if args.prepare_only:
        return 0
    vocab = SHAPES[args.shape].vocab
    results: dict = {}
    runners = {"single": (question_single, f"batch 1, seq {args.seq}: {args.runs} runs per variant"),
               "multi": (question_multi, f"batch 16, seq {args.multi_seq}: {args.multi_runs} runs per variant"),
               "generate": (question_generate, f"generation: {args.gen_runs} runs per variant")}
    for question in QUESTIONS:
        if question in args.questions:
            run, label = runners[question]
            log(label)
            results[question] = run(paths, args, vocab)
    if not args.no_profile:
        log(f"profiler: {args.profile_runs} runs per variant")
        results["profile"] = profile(paths, args, vocab)
    loads.append(os.getloadavg()[0])
    seconds = time.perf_counter() - started
    text = report(args, results)
    print()
    print(text)
    print(f"\nMachine: {machine_line(args, loads)}. Took {seconds / 60:.1f} min.")
    dump = {q: {"times": r[0], "checks": r[1]} for q, r in results.items() if q != "profile"}
    (args.cache / "last_run.json").write_text(
        json.dumps({**dump, "profile": results.get("profile", {}), "loads": loads}, indent=1))
    if args.no_write:
        return 0
    section = SECTIONS[args.device]
    write_part(section, f"{args.shape} shape, {args.dtype}", section_body(args, text, loads, seconds), args.output)
    log(f"wrote {section!r} ({args.shape}, {args.dtype}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
