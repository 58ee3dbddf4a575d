"""Are onnx-peft's graph passes faster and leaner than Olive's ExtractAdapters, and do they stream?

Two models, built once and cached in the work dir (default /tmp/onnx_peft_bench):

- small: a Llama-shaped fp32 model (hidden 1024, intermediate 2816, 16 heads, vocab 32000,
  5 layers, ~0.5 GB) with LoRA r=16 on all 7 projections and random non-zero B, wrapped with
  onnx_peft.get_peft_model and exported by onnx_peft.export (torch.onnx dynamo) with external
  data; also the base model alone and the adapter as a PEFT folder (for insert).
- 7b: a 7B-shaped fp16 graph (hidden 4096, intermediate 11008, 32 layers, vocab 32000, ~13.5 GB)
  written directly with onnx_ir, one tensor at a time, random weights on disk as external
  data: per layer the 7 projections as ``Add(MatMul(x, W), Mul(MatMul(MatMul(x, A), B), s))``
  with initializers named ``model.layers.N.self_attn.q_proj.weight`` and
  ``...q_proj.lora_A.default.weight`` (the dynamo export pattern, optimize=False names).

Every measured call runs alone in a fresh subprocess. Time: the call itself (imports
excluded), median of ``--repeat`` runs. Memory: peak RSS of the process (getrusage
ru_maxrss), plus the peaks of anonymous and file-backed (memory-mapped) RSS polled from
/proc every 50 ms. Olive 0.13 runs in its own venv (.venv-olive) through
benchmarks/_olive_extract.py.

    python benchmarks/passes.py            # ~15-20 min on 2 cores (first run builds the models)
    python benchmarks/passes.py --quick    # 2-layer small model, 4-layer 7B-shaped slice
    python benchmarks/passes.py --no-write # print only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, write_section

SECTION = "## Graph passes (benchmarks/passes.py)"
OLIVE_PYTHON = ROOT / ".venv-olive" / "bin" / "python"
OLIVE_SCRIPT = ROOT / "benchmarks" / "_olive_extract.py"
RANK = 16
# 7B-shaped runs are killed past this much anonymous RSS (the machine has 24 GB, no swap, and is shared)
ANON_CAP_MB = 8 * 1024
# ... or past this many seconds (the full run should stay near 20 minutes)
TIME_CAP_S = 300
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


# ------------------------------------------------------------------ model builders (children)


def build_small(folder: Path, layers: int) -> None:
    """PEFT-wrapped Llama exported in-graph, the base exported alone, the adapter as a PEFT dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnx_peft import LoraConfig, export, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         max_position_embeddings=512, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    export(base, folder / "base", quiet=True, external_data=True)
    lora = LoraConfig(r=RANK, lora_alpha=32, target_modules=[p for _, p in PROJECTIONS])
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.eval()
    model.save_pretrained(folder / "adapter")
    export(model, folder / "peft", mode="in-graph", quiet=True, external_data=True)


def build_7b(folder: Path, layers: int, hidden: int = 4096, intermediate: int = 11008,
             vocab: int = 32000) -> None:
    """A 7B-shaped fp16 Linear skeleton with LoRA branches; weights written straight to disk."""
    import numpy as np
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 25, dtype=np.float32) * 0.02).astype(np.float16)  # 64 MB
    fp16 = ir.DataType.FLOAT16
    offset = 0
    data = open(folder / data_name, "wb")

    def weight(name: str, shape: tuple[int, ...]) -> ir.Value:
        """Write a random [*shape] fp16 tensor at the end of the data file; an initializer for it."""
        nonlocal offset
        count = int(np.prod(shape))
        start = int(rng.integers(0, pool.size))
        written = 0
        while written < count:  # the pool, from a random start, wrapped: random enough, fast
            chunk = pool[start:start + (count - written)]
            data.write(chunk.tobytes())
            written += chunk.size
            start = 0
        tensor = ir.ExternalTensor(data_name, offset=offset, length=count * 2, dtype=fp16,
                                   shape=ir.Shape(shape), name=name, base_dir=folder)
        offset += count * 2
        pad = (-offset) % 4096
        data.write(b"\0" * pad)
        offset += pad
        value = ir.Value(name=name, type=ir.TensorType(fp16), shape=ir.Shape(shape), const_value=tensor)
        graph.register_initializer(value)
        return value

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    graph = ir.Graph([ids], [], nodes=[], name="llama7b_skeleton", opset_imports={"": 18})
    scale = ir.Value(name="lora_scale", type=ir.TensorType(fp16), shape=ir.Shape([]),
                     const_value=ir.tensor(np.array(2.0, np.float16), name="lora_scale"))
    graph.register_initializer(scale)

    def node(op: str, inputs: list[ir.Value], name: str) -> ir.Value:
        n = ir.Node("", op, inputs, name=name, num_outputs=1)
        n.outputs[0].name = name.replace("/", ".") + ".out"
        graph.append(n)
        return n.outputs[0]

    def linear(x: ir.Value, module: str, fan_in: int, fan_out: int, lora: bool = True) -> ir.Value:
        w = weight(f"{module}.weight", (fan_in, fan_out))
        y = node("MatMul", [x, w], f"{module}/MatMul")
        if not lora:
            return y
        a = weight(f"{module}.lora_A.default.weight", (fan_in, RANK))
        b = weight(f"{module}.lora_B.default.weight", (RANK, fan_out))
        xa = node("MatMul", [x, a], f"{module}/lora_A/MatMul")
        xab = node("MatMul", [xa, b], f"{module}/lora_B/MatMul")
        scaled = node("Mul", [xab, scale], f"{module}/lora/Mul")
        return node("Add", [y, scaled], f"{module}/Add")

    embed = weight("model.embed_tokens.weight", (vocab, hidden))
    h = node("Gather", [embed, ids], "model/embed_tokens/Gather")
    for i in range(layers):
        p = f"model.layers.{i}"
        q = linear(h, f"{p}.self_attn.q_proj", hidden, hidden)
        k = linear(h, f"{p}.self_attn.k_proj", hidden, hidden)
        v = linear(h, f"{p}.self_attn.v_proj", hidden, hidden)
        attn = node("Add", [node("Mul", [q, k], f"{p}/attn/Mul"), v], f"{p}/attn/Add")
        h = node("Add", [h, linear(attn, f"{p}.self_attn.o_proj", hidden, hidden)], f"{p}/res1")
        gate = linear(h, f"{p}.mlp.gate_proj", hidden, intermediate)
        up = linear(h, f"{p}.mlp.up_proj", hidden, intermediate)
        act = node("Mul", [node("Sigmoid", [gate], f"{p}/mlp/act"), up], f"{p}/mlp/Mul")
        h = node("Add", [h, linear(act, f"{p}.mlp.down_proj", intermediate, hidden)], f"{p}/res2")
    logits = linear(h, "lm_head", hidden, vocab, lora=False)
    logits.name = "logits"
    graph.outputs.append(logits)
    data.close()
    model = ir.Model(graph, ir_version=10, producer_name="onnx_peft.benchmarks")
    ir.save(model, folder / "model.onnx")  # external tensors keep their location and offsets


# ------------------------------------------------------------------ measured calls (children)


def run_task(task: str, src: Path, out: Path) -> dict:
    """One pass call on ``src`` writing under ``out``; returns the call's seconds."""
    from onnx_peft.passes.extract_adapters import extract_adapters
    from onnx_peft.passes.insert_adapters import insert_adapters
    from onnx_peft.passes.merge_adapters import merge_adapters

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if task == "extract-inputs":
        extract_adapters(src / "model.onnx", out, make_inputs=True)
    elif task == "extract-external":
        extract_adapters(src / "model.onnx", out, make_inputs=False, external=True)
    elif task == "merge":
        out.mkdir(parents=True, exist_ok=True)
        merge_adapters(src / "model.onnx", out / "model.onnx")
    elif task == "insert":
        insert_adapters(src / "base" / "model.onnx", {"default": src / "adapter"}, out)
    else:
        raise SystemExit(f"unknown task {task}")
    return {"seconds": time.perf_counter() - start, "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ parent: measuring


def _proc_rss(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    anon = re.search(r"RssAnon:\s+(\d+)", text)
    file = re.search(r"RssFile:\s+(\d+)", text)
    return (int(anon.group(1)) if anon else 0, int(file.group(1)) if file else 0)


def measure(cmd: list[str], timeout: float = 1800, anon_cap_mb: float | None = None,
            time_cap_s: float | None = None) -> dict:
    """Run ``cmd``; its JSON line plus polled peaks of RssAnon/RssFile (MB) and wall seconds.

    With ``anon_cap_mb`` the child is killed once its anonymous RSS passes the cap (so a pass
    that would exhaust the machine's memory is reported, not allowed to take the machine down);
    with ``time_cap_s`` once it has run that long.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peaks = [0, 0]
    killed = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            rss = _proc_rss(proc.pid)
            if rss:
                peaks[0], peaks[1] = max(peaks[0], rss[0]), max(peaks[1], rss[1])
                elapsed = time.perf_counter() - start
                over = (anon_cap_mb is not None and rss[0] / 1024 > anon_cap_mb) \
                    or (time_cap_s is not None and elapsed > time_cap_s)
                if over and not killed:
                    killed.append(elapsed)
                    proc.kill()
            done.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        done.set()
        thread.join()
    wall = time.perf_counter() - start
    extra = {"anon_peak_mb": peaks[0] / 1024, "file_peak_mb": peaks[1] / 1024, "process_seconds": wall}
    if killed:
        return {"killed": True, "seconds": killed[0], "peak_rss_mb": (peaks[0] + peaks[1]) / 1024, **extra}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(extra)
    return result


def ours(task: str, src: Path, out: Path, anon_cap_mb: float | None = None,
         time_cap_s: float | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    try:
        return measure([sys.executable, __file__, "--child", task, str(src), str(out)],
                       anon_cap_mb=anon_cap_mb, time_cap_s=time_cap_s)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def olive(mode: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    try:
        return measure([str(OLIVE_PYTHON), str(OLIVE_SCRIPT), str(src / "model.onnx"), str(out), mode])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def best_of(fn, repeat: int) -> dict:
    """Median time of ``repeat`` runs; memory figures of the run with the largest peak RSS."""
    runs = [fn() for _ in range(repeat)]
    worst = max(runs, key=lambda r: r["peak_rss_mb"])
    return {**worst, "seconds": statistics.median(r["seconds"] for r in runs), "runs": len(runs)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure(folder: Path, marker: str, build_args: list[str]) -> float:
    """Build a model in a child process unless it is cached; returns the build seconds (0 if cached)."""
    if (folder / marker).is_file():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build", *build_args, str(folder)], check=True, cwd=ROOT)
    return time.perf_counter() - start


# ------------------------------------------------------------------ report


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GB RAM, no GPU, Linux {platform.release()}"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(rows: list[tuple]) -> str:
    head = ("model", "pass", "tool", "time (s)", "peak RSS (MB)", "anon / mmap peak (MB)",
            "time ours/Olive", "RSS ours/Olive")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def row(model: str, label: str, tool: str, r: dict | None, ref: dict | None = None) -> tuple:
    if r is None:
        return (model, label, tool, "n/a", "n/a", "n/a", "", "")
    if r.get("killed"):
        return (model, label, tool, f"killed at {r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f} (and growing)",
                f"{r['anon_peak_mb']:.0f} / {r['file_peak_mb']:.0f}", "", "")
    ratio_t = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else ""
    ratio_m = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else ""
    return (model, label, tool, f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}",
            f"{r['anon_peak_mb']:.0f} / {r['file_peak_mb']:.0f}", ratio_t, ratio_m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer small model, 4-layer 7B-shaped slice")
    parser.add_argument("--workdir", default="/tmp/onnx_peft_bench")
    parser.add_argument("--repeat", type=int, default=None, help="runs per small-model measurement")
    parser.add_argument("--layers-7b", type=int, default=None, help="layers of the 7B-shaped model (32)")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--skip-olive", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small_layers = 2 if args.quick else 5
    big_layers = args.layers_7b or (4 if args.quick else 32)
    repeat = args.repeat or (1 if args.quick else 3)

    small = work / f"small_{small_layers}l"
    built = ensure(small, "peft/model.onnx", ["small", str(small_layers)])
    print(f"small model: {small} ({gb(folder_bytes(small / 'peft'))} on disk, built in {built:.0f} s)", flush=True)
    results: dict[str, dict | None] = {}
    out = work / "out"
    for task in ("extract-inputs", "extract-external", "merge", "insert"):
        src = small if task == "insert" else small / "peft"
        results[f"ours {task}"] = best_of(lambda t=task, s=src: ours(t, s, out), repeat)
        print(f"  ours {task}: {results[f'ours {task}']['seconds']:.2f} s, "
              f"{results[f'ours {task}']['peak_rss_mb']:.0f} MB", flush=True)
    olive_ok = not args.skip_olive and OLIVE_PYTHON.is_file()
    for mode in ("inputs", "external"):
        key = f"olive extract-{mode}"
        results[key] = None
        if olive_ok:
            try:
                results[key] = best_of(lambda m=mode: olive(m, small / "peft", out), repeat)
                print(f"  olive extract-{mode}: {results[key]['seconds']:.2f} s, "
                      f"{results[key]['peak_rss_mb']:.0f} MB", flush=True)
            except RuntimeError as exc:
                print(f"  olive extract-{mode} failed: {exc}", flush=True)

    big = work / f"llama7b_fp16_{big_layers}l"
    big_results: dict[str, dict] = {}
    big_size = 0
    if not args.skip_7b:
        need = 3.5 * 2 * (big_layers * 202_383_360 + 2 * 32000 * 4096) * (0 if (big / "model.onnx").is_file() else 1)
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free / 1e9:.0f} GB free, the 7B-shaped run needs ~{need / 1e9:.0f} GB; "
                             "use --layers-7b N or --skip-7b")
        built = ensure(big, "model.onnx", ["7b", str(big_layers)])
        big_size = folder_bytes(big)
        print(f"7B-shaped model: {big} ({gb(big_size)}, built in {built:.0f} s)", flush=True)
        for task in ("extract-inputs", "merge"):
            big_results[task] = ours(task, big, out, anon_cap_mb=ANON_CAP_MB, time_cap_s=TIME_CAP_S)
            killed = " (killed: past the RSS or time cap)" if big_results[task].get("killed") else ""
            print(f"  ours {task}: {big_results[task]['seconds']:.1f} s, "
                  f"{big_results[task]['peak_rss_mb']:.0f} MB{killed}", flush=True)

    small_name = f"Llama {small_layers}L fp32 ({gb(folder_bytes(small / 'peft'))})"
    rows = [
        row(small_name, "extract (make_inputs)", "onnx-peft", results["ours extract-inputs"],
            results["olive extract-inputs"]),
        row(small_name, "extract (make_inputs)", "Olive 0.13", results["olive extract-inputs"]),
        row(small_name, "extract (external)", "onnx-peft", results["ours extract-external"],
            results["olive extract-external"]),
        row(small_name, "extract (external)", "Olive 0.13", results["olive extract-external"]),
        row(small_name, "merge (in-graph branches)", "onnx-peft", results["ours merge"]),
        row(small_name, "insert (base + PEFT dir)", "onnx-peft", results["ours insert"]),
    ]
    if big_results:
        big_name = f"7B-shaped {big_layers}L fp16 ({gb(big_size)})"
        rows += [row(big_name, "extract (make_inputs)", "onnx-peft", big_results["extract-inputs"]),
                 row(big_name, "merge (in-graph branches)", "onnx-peft", big_results["merge"])]
    text = table(rows)
    print()
    print(text)
    command = "python benchmarks/passes.py" + (" --quick" if args.quick else "")
    section = "\n".join([
        SECTION, "",
        f"Command: `{command}`. Machine: {machine()}. Olive: olive-ai 0.13.0 in `.venv-olive` "
        "(torch 2.13.0 CPU, onnx 1.23.2, onnxruntime 1.32.0, onnx-ir 1.1.0).", "",
        text, "",
        f"Method: each call runs alone in a fresh subprocess; time is the call itself (imports "
        f"excluded), median of {repeat} run(s) for the small model, 1 run for the 7B-shaped one; peak RSS is "
        "the process's ru_maxrss (imports included: Olive imports torch), anon/mmap the peaks of "
        "RssAnon/RssFile polled every 50 ms (file pages of memory-mapped weights are reclaimable "
        "page cache but count in RSS). The small model is onnx_peft.export of a PEFT-wrapped "
        "LlamaForCausalLM (r=16, 7 projections, random B) with external data; the 7B-shaped model "
        "is a MatMul skeleton (7 LoRA'd projections per layer + embedding + lm_head) written with "
        f"onnx_ir; 7B-shaped runs are killed past {ANON_CAP_MB // 1024} GB anonymous RSS or {TIME_CAP_S} s. "
        "Goals: extract time <= 0.2x and peak RSS <= 0.3x Olive's; 7B-shaped peak RSS <= 2 GB. "
        "Other sessions shared the 2 cores during the run, so times carry noise.",
    ])
    if not args.no_write:
        write_section(SECTION, section, ROOT / "BENCHMARKS.md")
        print(f"\nwrote {SECTION!r} in BENCHMARKS.md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_task(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--build":
        kind, layers, folder = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        if kind == "small":
            build_small(folder, layers)
        else:
            build_7b(folder, layers)
    else:
        main()
