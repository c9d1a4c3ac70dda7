"""Counters and latency histograms for reports.

Latencies go into log2-microsecond buckets (bucket k holds values in [2^(k-1), 2^k) us, bucket 0
holds < 1 us), which is cheap to record on a hot path and still gives honest tails. Percentiles
come from the exact samples while they fit in a bounded reservoir (all of them for any run this
tool makes), so p50/p99 are not bucket-rounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

MAX_SAMPLES = 1 << 20


@dataclass
class LatencyRecorder:
    """Records durations in nanoseconds; reports microseconds."""

    samples: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=lambda: [0] * 40)
    count: int = 0

    def record_ns(self, ns: int) -> None:
        self.count += 1
        us = ns // 1000
        self.buckets[min(us.bit_length(), 39)] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(ns)

    def percentile_us(self, q: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        idx = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
        return round(ordered[idx] / 1000.0, 1)

    def histogram(self) -> dict[str, int]:
        """Non-empty buckets as {"<1": n, "1-2": n, "2-4": n, ...} in microseconds."""
        out: dict[str, int] = {}
        for k, n in enumerate(self.buckets):
            if n:
                label = "<1" if k == 0 else f"{1 << (k - 1)}-{1 << k}"
                out[label] = n
        return out

    def report(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50": self.percentile_us(50),
            "p90": self.percentile_us(90),
            "p99": self.percentile_us(99),
            "max": round(max(self.samples) / 1000.0, 1) if self.samples else None,
            "histogram": self.histogram(),
        }


class Stopwatch:
    """Monotonic nanosecond timer for phases."""

    def __init__(self) -> None:
        self.start_ns = time.monotonic_ns()

    def elapsed_ns(self) -> int:
        return time.monotonic_ns() - self.start_ns

    def elapsed_s(self) -> float:
        return self.elapsed_ns() / 1e9


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
