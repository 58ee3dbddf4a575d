"""The per-row part of benchmarks/methods.py: what does a batch whose rows each use their own
adapter cost, per method, next to the base and to LoRA's per-row banks at the same budget?

Each method's slot model (methods.py's ``slots_<METHOD>``) goes through the MultiAdapter pass
(``multi_<METHOD>/model.onnx``: every slot becomes a bank ``[N, ...]`` gathered by
``adapter_ids [batch]``). Forms without a per-row form (``dense``: SHiRA, C3A, WaveFT, ...) are
refused by the pass; the refusal is recorded (``multi_refused.json``) and reported, not timed.

Run: batch ``BATCH`` x seq ``SEQ`` (as many tokens as methods.py's batch 1 x seq 128), the
method's adapter file loaded ``BATCH`` times under distinct names, row i taking the i-th: the
banks hold ``BATCH`` rows and every row gathers its own (the cost depends on the shapes, not the
values, so one adapter file serves). One interleaved run over the base and every MultiAdapter
model, medians; ratios to the base and to the LoRA MultiAdapter model at the same budget.
Check: the multi model's logits equal the slot model's with the adapter active (same feeds).
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import runtime as rt  # benchmarks/runtime.py: feeds
from common import interleaved, log, med, session

BATCH, SEQ = 4, 32
BASE_ROWS = "base (batch 4)"


def build_multi(paths: dict[str, Path], specs: list[Any], cache: Path) -> dict[str, Path | str]:
    """label -> the MultiAdapter model, or the pass's refusal (one line) where it has none."""
    from onnx_peft.errors import OnnxPeftError
    from onnx_peft.passes.multi_adapter import multi_adapter

    refused_path = cache / "multi_refused.json"
    refused = json.loads(refused_path.read_text()) if refused_path.is_file() else {}
    out: dict[str, Path | str] = {}
    for spec in specs:
        target = cache / f"multi_{spec.key}" / "model.onnx"
        if spec.key in refused:
            out[spec.label] = refused[spec.key]
            continue
        if not target.is_file():
            log(f"MultiAdapter pass: {spec.key}")
            try:
                multi_adapter(paths[spec.key], target.parent, overwrite=True)
            except OnnxPeftError as exc:
                refused[spec.key] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                refused_path.write_text(json.dumps(refused, indent=1))
                out[spec.label] = refused[spec.key]
                continue
        out[spec.label] = target
    return out


def time_rows(paths: dict[str, Path], args: Any, adapter_file: Any) -> tuple[dict, dict]:
    """Interleaved run of the base and every MultiAdapter model, batch 4, 4 distinct adapters."""
    feeds = rt.llm_feeds(BATCH, SEQ, seed=1)
    names = [f"row{i}" for i in range(BATCH)]
    models = {label: m for label, m in args.multi.items() if not isinstance(m, str)}
    keys = {s.label: s.key for s in args.specs}
    sessions = {BASE_ROWS: session(paths["base"], spinning=False)}
    checks: dict[str, float] = {}
    for label, model in models.items():
        sess = session(model, spinning=False)
        for name in names:
            sess.load_adapter(name, adapter_file(paths, keys[label]))
        out = sess.run(["logits"], feeds, adapter=names)[0]
        checks[label] = float(np.abs(out - args.row_refs[label]).max())
        sessions[label] = sess
    variants = {
        label: (lambda sess=sess, rows=None if label == BASE_ROWS else names: sess.run(["logits"], feeds,
                                                                                      adapter=rows))
        for label, sess in sessions.items()
    }
    log(f"per-row: {len(variants)} variants x {args.row_runs} interleaved runs")
    times = interleaved(variants, args.row_runs, args.warmup, args.seed + 2, "per-row")
    sessions.clear()
    gc.collect()
    return times, checks


def rows_report(args: Any, times: dict, checks: dict, static: dict) -> str:
    """The per-row table, then the refusals and the checks."""
    base = med(times[BASE_ROWS])
    lines = [
        f"Per row (MultiAdapter pass, benchmarks/methods_rows.py): batch {BATCH} x seq {SEQ}, row i with its own adapter "
        f"({BATCH} adapters loaded, banks of {BATCH} rows), {args.row_runs} interleaved runs per variant; base median "
        f"{base * 1e3:.1f} ms.",
        "",
        "| method | form(s) | median ms | x base | x LoRA same budget (per row) | LoRA at the same budget |",
        "|---|---|---:|---:|---:|---|",
        f"| base | | {base * 1e3:.1f} | 1.000 | | |",
    ]
    refused = []
    for s in args.specs:
        if s.label not in args.multi:
            continue
        model, ref = args.multi[s.label], args.match[s.label]
        if isinstance(model, str):
            reason = re.sub(r"\S+model\.onnx: ", "", model)  # the cache path says nothing here
            refused.append(f"{s.label} ({' + '.join(static[s.label]['forms'])}): {reason}")
            continue
        t = med(times[s.label])
        vs = f"{t / med(times[ref]):.3f}" if ref in times else "(LoRA refused?)"
        lines.append(f"| {s.label} | {' + '.join(static[s.label]['forms'])} | {t * 1e3:.1f} | {t / base:.3f} | {vs} "
                     f"| {'itself' if ref == s.label else ref} |")
    lines.append("")
    if refused:
        lines += ["No per-row form (the MultiAdapter pass refuses; merge these adapters, or run one per session):",
                  *[f"- {r}" for r in refused], ""]
    lines.append("Checks, max |logits diff| of each MultiAdapter model (rows with their adapters) against its slot "
                 "model with the adapter active: " + "; ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    return "\n".join(lines)
