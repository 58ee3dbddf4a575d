"""The parent side: feed cases to child processes, time them out, restart after hangs/crashes.

``run_cases(seed, indices, corpus, work)`` returns one report per case. A case that does not
answer within ``timeout`` seconds is a ``hang``: its child is killed and a new child runs the
rest. A child that dies mid-case (signal, abort) makes that case a ``crash``.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fuzz_cases import plan

HERE = Path(__file__).resolve().parent
TIMEOUT = float(os.environ.get("ONNX_PEFT_FUZZ_TIMEOUT", "20"))


def _start(seed: int, indices: list[int], corpus: dict[str, str], work: Path, log) -> subprocess.Popen:
    cases = [[i, plan(seed, i).target, plan(seed, i).op] for i in indices]
    job = Path(tempfile.mkstemp(prefix="job_", suffix=".json", dir=work)[1])
    job.write_text(json.dumps({"corpus": corpus, "work": str(work), "seed": seed, "cases": cases}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "ONNX_PEFT_QUIET": "1",
           "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    return subprocess.Popen([sys.executable, str(HERE / "fuzz_child.py"), str(job)], stdout=subprocess.PIPE,
                            stderr=log, env=env, text=True, bufsize=1)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    child.stdout.close()


def run_cases(seed: int, indices: list[int], corpus: dict[str, str], work: Path,
              timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    work.mkdir(parents=True, exist_ok=True)
    pending = list(indices)
    reports: list[dict[str, Any]] = []
    with open(work / "children.log", "a") as log:
        while pending:
            child = _start(seed, pending, corpus, work, log)
            current, deadline = None, time.monotonic() + 120  # imports, first case
            selector = selectors.DefaultSelector()
            selector.register(child.stdout, selectors.EVENT_READ)
            while True:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    kind, detail = ("hang", f"no answer in {timeout:.0f} s") if current is not None else \
                        ("crash", "child did not start")
                    break
                line = child.stdout.readline()
                if not line:  # the child exited
                    child.wait()
                    kind, detail = "crash", f"child exited with {child.returncode}"
                    break
                message = json.loads(line)
                if "start" in message:
                    current, deadline = message["start"], time.monotonic() + timeout
                    continue
                reports.append(message)
                pending.remove(message["index"])
                current = None
            selector.close()
            _stop(child)
            if current is not None:  # the case that hung or killed its child
                case = plan(seed, current)
                reports.append(dict(seed=seed, index=current, target=case.target, op=case.op, label="?",
                                    outcome="accepted", failure=kind, detail=detail, seconds=timeout, rss_mb=0))
                pending.remove(current)
            elif pending and kind == "crash" and child.returncode not in (0, 3):
                raise RuntimeError(f"fuzz child failed outside a case ({detail}); see {work / 'children.log'}")
    return reports


def repro_command(report: dict[str, Any]) -> str:
    return f"python tests/fuzz/fuzz_run.py --seed {report['seed']} --case {report['index']}"


def summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals: per target/op, outcomes, failures by class."""
    def outcome(r):
        return "FAIL:" + r["failure"] if r["failure"] else r["outcome"].split(":")[0]

    return {
        "cases": len(reports),
        "by_target_op": dict(sorted(Counter(f"{r['target']}/{r['op']}" for r in reports).items())),
        "outcomes": dict(sorted(Counter(outcome(r) for r in reports).items())),
        "typed_errors": dict(sorted(Counter(r["outcome"].split(":")[1] for r in reports
                                            if r["outcome"].startswith("typed") and not r["failure"]).items())),
        "failures": dict(sorted(Counter(r["failure"] for r in reports if r["failure"]).items())),
        "max_seconds": max((r["seconds"] for r in reports), default=0),
        "max_rss_mb": max((r["rss_mb"] for r in reports), default=0),
    }


def describe(report: dict[str, Any]) -> str:
    return (f"[{report['failure']}] case {report['seed']}:{report['index']} {report['target']}/{report['op']} "
            f"({report['label']}): {report['detail']}\n    repro: {repro_command(report)}")
