"""The child process of the fuzzer: runs a list of cases, one JSON line per case on stdout.

    python tests/fuzz/fuzz_child.py JOB.json

JOB: ``{"corpus": {...}, "work": dir, "seed": S, "cases": [[index, target, op], ...]}``. Before
each case it writes ``{"start": index}`` so the parent knows which case hung or crashed. The
address space is capped (RLIMIT_AS, ``ONNX_PEFT_FUZZ_AS_MB``, default 2 GB) so a runaway
allocation is a MemoryError here rather than a swapping machine; peak RSS (ru_maxrss, a running
maximum) is reported per case and the child exits once it passes the limit, so each case's
peak is its own or an earlier case's that stayed below it. The protocol uses a private copy of
stdout: anything the library prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

AS_MB = int(os.environ.get("ONNX_PEFT_FUZZ_AS_MB", "2048"))


def main(job_path: str) -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints land on stderr
    limit = AS_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    job = json.loads(Path(job_path).read_text())
    from fuzz_cases import RSS_LIMIT_MB, Case, run_case

    import onnx_peft.runtime  # noqa: F401  (import cost paid once, before the first case's clock)

    for index, target, op in job["cases"]:
        protocol.write(json.dumps({"start": index}) + "\n")
        report = run_case(Case(job["seed"], index, target, op), job["corpus"], Path(job["work"]))
        protocol.write(json.dumps(report) + "\n")
        if report["rss_mb"] > RSS_LIMIT_MB:
            return 3  # a fresh child measures the next case from a clean baseline
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
