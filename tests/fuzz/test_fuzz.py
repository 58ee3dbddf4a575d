"""Seeded, bounded mutation fuzzing of every reader and writer (issue 13).

Hostile PEFT dirs, adapter files (.safetensors, .npz, .onnx_adapter) and ONNX models go through
load_adapter (+ a run), convert_adapters, inspect, insert, merge, extract and multi_adapter, each
case in a child process with a time limit and an address-space limit (tests/fuzz/fuzz_cases.py
lists the failure classes). Every case must end in a typed OnnxPeftError or in a finite,
complete output, with its inputs untouched and no temporaries left.

    ONNX_PEFT_FUZZ_CASES=5000 ONNX_PEFT_FUZZ_SEED=7 pytest tests/fuzz -n 2

Defaults: 240 cases, seed 0, in shards of 20 (each shard one child process, so xdist spreads
them). A failure prints each failing case with a one-line repro command.
"""

from __future__ import annotations

import os

import pytest
from fuzz_runner import describe, run_cases, summary

CASES = int(os.environ.get("ONNX_PEFT_FUZZ_CASES", "240"))
SEED = int(os.environ.get("ONNX_PEFT_FUZZ_SEED", "0"))
SHARD = 20
SHARDS = [range(start, min(start + SHARD, CASES)) for start in range(0, CASES, SHARD)]


@pytest.mark.parametrize("cases", SHARDS, ids=[f"cases{r.start}-{r.stop - 1}" for r in SHARDS])
def test_hostile_inputs_end_in_a_typed_error_or_a_clean_output(cases, fuzz_corpus, tmp_path):
    reports = run_cases(SEED, list(cases), fuzz_corpus, tmp_path)

    assert sorted(r["index"] for r in reports) == list(cases)  # every case judged exactly once
    failing = [r for r in reports if r["failure"]]
    assert not failing, f"{len(failing)} of {len(reports)} fuzz cases failed (seed {SEED}):\n" + \
        "\n".join(describe(r) for r in failing) + f"\ntotals: {summary(reports)['outcomes']}"
