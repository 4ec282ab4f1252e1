"""Time the gateway itself adds to a message, kept as a bounded sample for percentiles.

Two paths: a client's audio frame from the moment it was read off the socket until it is published
on the bus (`audio_in`), and a bus message from the moment the gateway's inbox reader handed it to
the session until its frame is written to the client's socket (`to_client`). Both are measured on
every message (two clock reads and an append), so the capacity benchmark reads the gateway's own
figures under load (`/admin/resources/stats` `latency`)."""
from __future__ import annotations

from collections import deque

SAMPLE = 50_000  # the latest observations kept per path


class LatencySample:
    def __init__(self, size: int = SAMPLE) -> None:
        self._ms: deque[float] = deque(maxlen=size)

    def observe(self, ms: float) -> None:
        self._ms.append(ms)

    def reset(self) -> None:
        self._ms.clear()

    def summary(self) -> dict[str, float | int | None]:
        values = sorted(self._ms)
        if not values:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

        def rank(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))], 3)

        return {"n": len(values), "p50_ms": rank(0.50), "p99_ms": rank(0.99), "max_ms": round(values[-1], 3)}


class GatewayLatency:
    def __init__(self) -> None:
        self.audio_in = LatencySample()
        self.to_client = LatencySample()

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {"audio_in": self.audio_in.summary(), "to_client": self.to_client.summary()}

    def reset(self) -> None:
        self.audio_in.reset()
        self.to_client.reset()
