"""Prometheus text for ``/metrics``, written by hand (no client library on a deploy box).

Series (``onnx_peft_serve_`` prefix)::

    requests_total{endpoint, adapter, code}      counter
    request_seconds{adapter}                      histogram, request accepted -> answered
    batch_rows                                    histogram, rows per model run
    runs_total                                    counter, model runs (one per batch and adapter group)
    adapter_loads_total{adapter}                  counter (start-up loads and admin loads)
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFIX = "onnx_peft_serve_"


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus reads them."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]


class Metrics:
    """Thread-safe counters and histograms of one server (or one Ray replica)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency: dict[str, Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.runs = 0
        self.adapter_loads: Counter[str] = Counter()

    def request(self, endpoint: str, adapter: str | None, code: int, seconds: float | None = None) -> None:
        name = adapter or "base"
        with self._lock:
            self.requests[(endpoint, name, code)] += 1
            if seconds is not None:
                self.latency[name].observe(seconds)

    def run(self, rows: int) -> None:
        with self._lock:
            self.runs += 1
            self.batch_rows.observe(rows)

    def adapter_loaded(self, name: str) -> None:
        with self._lock:
            self.adapter_loads[name] += 1

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}requests_total Requests answered, by endpoint, adapter and status code.",
                     f"# TYPE {p}requests_total counter"]
            for (endpoint, adapter, code), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{endpoint="{endpoint}",adapter="{_esc(adapter)}",code="{code}"}} {n}')
            lines += [f"# HELP {p}request_seconds Latency from request accepted to response, by adapter.",
                      f"# TYPE {p}request_seconds histogram"]
            for adapter, hist in sorted(self.latency.items()):
                lines += hist.lines(f"{p}request_seconds", f'adapter="{_esc(adapter)}"')
            lines += [f"# HELP {p}batch_rows Rows per model run.", f"# TYPE {p}batch_rows histogram",
                      *self.batch_rows.lines(f"{p}batch_rows"),
                      f"# HELP {p}runs_total Model runs (one per batch, or per adapter group of a batch).",
                      f"# TYPE {p}runs_total counter", f"{p}runs_total {self.runs}",
                      f"# HELP {p}adapter_loads_total Adapters loaded into the session.",
                      f"# TYPE {p}adapter_loads_total counter"]
            for adapter, n in sorted(self.adapter_loads.items()):
                lines.append(f'{p}adapter_loads_total{{adapter="{_esc(adapter)}"}} {n}')
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
