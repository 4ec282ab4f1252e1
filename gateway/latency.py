"""Time the gateway itself adds to a message, kept as a bounded sample for percentiles.

Two paths: a client's audio frame from the moment it was read off the socket until it is published
on the bus (`audio_in`), and a bus message from the moment the gateway's inbox reader handed it to
the session until its frame is written to the client's socket (`to_client`). Both are measured on
every message (two clock reads and an append), so the capacity benchmark reads the gateway's own
figures under load (`/admin/resources/stats` `latency`). `n` is how many the percentiles are taken
over (the latest `SAMPLE`), `count` every message since the last reset: the benchmark divides the
gateway's CPU time by it (CPU per client frame does not move with how far behind the clients fell)."""
from __future__ import annotations

from collections import deque

from shared.percentiles import percentile

SAMPLE = 50_000  # the latest observations kept per path


class LatencySample:
    def __init__(self, size: int = SAMPLE) -> None:
        self._ms: deque[float] = deque(maxlen=size)
        self.count = 0  # every observation since the last reset, also those the sample no longer holds

    def observe(self, ms: float) -> None:
        self._ms.append(ms)
        self.count += 1

    def reset(self) -> None:
        self._ms.clear()
        self.count = 0

    def summary(self) -> dict[str, float | int | None]:
        if not self._ms:
            return {"n": 0, "count": self.count, "p50_ms": None, "p99_ms": None, "max_ms": None}
        p50, p99 = percentile(self._ms, 50), percentile(self._ms, 99)
        return {
            "n": len(self._ms),
            "count": self.count,
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "max_ms": round(max(self._ms), 3),
        }


class GatewayLatency:
    def __init__(self) -> None:
        self.audio_in = LatencySample()
        self.to_client = LatencySample()

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {"audio_in": self.audio_in.summary(), "to_client": self.to_client.summary()}

    def reset(self) -> None:
        self.audio_in.reset()
        self.to_client.reset()
