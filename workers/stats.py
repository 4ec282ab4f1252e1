"""Lifecycle figures a worker keeps about itself: counters, a cleanup-duration histogram, peaks."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

CLEANUP_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = CLEANUP_BUCKETS_MS
    counts: list[int] = field(default_factory=lambda: [0] * (len(CLEANUP_BUCKETS_MS) + 1))
    total: float = 0.0
    n: int = 0
    max: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1
        self.max = max(self.max, value)

    def buckets(self) -> dict[str, int]:
        """Cumulative counts per upper bound, as Prometheus histograms have them."""
        out, running = {}, 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            out[bound] = running
        return out


@dataclass
class WorkerStats:
    disconnect_events_received: int = 0
    conversations_cleaned: int = 0  # by a disconnect event
    stale_cleaned: int = 0  # by the sweep (a missed event, or a dead gateway's lease expired)
    sweeps: int = 0
    peak_conversations: int = 0
    cleanup_ms: Histogram = field(default_factory=Histogram)

    def summary(self) -> dict[str, float | int]:
        return {
            "disconnect_events_received": self.disconnect_events_received,
            "conversations_cleaned": self.conversations_cleaned,
            "stale_cleaned": self.stale_cleaned,
            "sweeps": self.sweeps,
            "peak_conversations": self.peak_conversations,
            "cleanup_count": self.cleanup_ms.n,
            "cleanup_ms_sum": round(self.cleanup_ms.total, 3),
            "cleanup_ms_max": round(self.cleanup_ms.max, 3),
        }

    def heartbeat(self) -> dict[str, object]:
        return {**self.summary(), "cleanup_ms_buckets": self.cleanup_ms.buckets()}
