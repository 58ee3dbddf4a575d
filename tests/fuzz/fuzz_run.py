"""Run the fuzzer outside pytest: a large run with totals, or one case again (repro).

    python tests/fuzz/fuzz_run.py --cases 3000 --workers 2 [--seed 0] [--json totals.json]
    python tests/fuzz/fuzz_run.py --seed 0 --case 117      # one case, in this process, traceback shown

The corpus (needs torch) is built once into ``--corpus`` (default: a folder in the temp dir)
and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fuzz_cases import plan, run_case  # noqa: E402
from fuzz_corpus import shared  # noqa: E402
from fuzz_runner import describe, run_cases, summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--case", type=int, help="replay this one case in-process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "onnx_peft_fuzz_corpus")
    parser.add_argument("--json", type=Path, help="write the totals and failing reports here")
    args = parser.parse_args(argv)
    corpus = shared(args.corpus)
    work = Path(tempfile.mkdtemp(prefix="onnx_peft_fuzz_"))
    if args.case is not None:
        case = plan(args.seed, args.case)
        report = run_case(case, corpus, work, reraise=True)
        print(json.dumps(report, indent=1))
        print(f"case folder (kept when it fails): {work / f'case_{args.case}'}")
        return 1 if report["failure"] else 0
    indices = list(range(args.start, args.start + args.cases))
    streams = [indices[i:: args.workers] for i in range(args.workers)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        reports = [r for part in pool.map(lambda s: run_cases(args.seed, s, corpus, work / f"w{s[0]}"), streams)
                   for r in part]
    totals = {**summary(reports), "seed": args.seed, "wall_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(totals, indent=1))
    failing = sorted((r for r in reports if r["failure"]), key=lambda r: r["index"])
    for report in failing:
        print(describe(report))
    if args.json:
        args.json.write_text(json.dumps({"totals": totals, "failures": failing}, indent=1))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
