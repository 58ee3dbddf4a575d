"""What every benchmark script shares: logging, interleaved timing, ORT sessions, machine facts,
and writing one script's own section of BENCHMARKS.md.

Timing is always interleaved (every variant once per round, in a random order), so drift of a
shared machine hits all variants alike; a script reports medians and their ratios.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: import onnx_peft from it
HEADER = "# Benchmarks\n\nEach section is written by the script it names.\n"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(
    variants: dict[str, Callable[[], Any]], runs: int, warmup: int, seed: int, label: str
) -> dict[str, list[float]]:
    """Call each variant ``warmup`` times, then ``runs`` rounds, each round in a random order;
    returns the seconds of every measured call, per variant."""
    rng = np.random.default_rng(seed)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    started = time.perf_counter()
    for i in range(runs):
        for key in rng.permutation(list(variants)):
            t0 = time.perf_counter()
            variants[key]()
            times[key].append(time.perf_counter() - t0)
        if time.perf_counter() - started > 60 and i % 10 == 9:
            log(f"  {label}: {i + 1}/{runs} rounds")
    return times


def session(path: Path, profile_prefix: str | None = None, threads: int = 0, spinning: bool = True):
    """An ``AdapterSession`` on ONNX Runtime's CPU provider (default threads unless ``threads``).

    ``spinning=False`` stops idle intra-op threads from busy-waiting after a run. Spinning is
    ORT's default, but with several sessions interleaved on few cores, one session's spinning
    pool slows the next session's run: a variant that follows another session's run more
    often (two of six variants on one session, four on another) then reads up to 25% slower.
    """
    import onnxruntime as ort

    from onnx_peft.runtime import AdapterSession

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return AdapterSession(path, providers=["CPUExecutionProvider"], session_options=options)


def versions() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, Python {platform.python_version()}"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def write_section(section: str, text: str, path: Path) -> None:
    """Replace the ``section`` heading's block of BENCHMARKS.md by ``text`` (which starts with
    that heading), or append it; every other script's section stays as it is."""
    old = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.write_text(new.rstrip("\n") + "\n")


def cuda_available() -> bool:
    """Whether this onnxruntime build has the CUDA provider (onnxruntime-gpu)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def device_session(path: Path, device: str, *, strategy: str = "slots", profile_prefix: str | None = None):
    """An ``AdapterSession`` on ``device`` ("cpu" or "cuda"; fp32 on CUDA without TF32, the
    session's default), default threads, ``strategy`` as AdapterSession takes it."""
    import onnxruntime as ort

    from onnx_peft.runtime import AdapterSession

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return AdapterSession(path, session_options=options, device=device, strategy=strategy)


def gpu_name() -> str:
    """The GPU's name: nvidia-smi, else torch.cuda, else "unknown"."""
    import subprocess

    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if found:
            return found.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "unknown"
