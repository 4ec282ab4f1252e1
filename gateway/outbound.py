"""What waits to be written to one client, bounded in bytes (`MAX_OUTBOUND_BYTES`).

Bounded in bytes, not frames: 4,096 queued frames could be 4,096 audio frames of up to 64 KiB,
256 MiB for a single client that stopped reading. Past the budget the client is too slow for a
real-time stream and the session closes it; nothing more is queued from then on. One frame is
always accepted into an empty queue, whatever its size, so a budget smaller than a frame cannot
wedge a healthy client."""
from __future__ import annotations

import asyncio
import time
from collections import deque

Frame = str | bytes


class Outbound:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.overflowed = False  # set once; the client is being closed
        self._frames: deque[tuple[Frame, float]] = deque()  # with when it was queued (perf_counter)
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: Frame) -> bool:
        """Queue a frame; False (and from then on always False) once the budget is exceeded.

        Server events are ASCII JSON, so a str's length is its size in bytes."""
        if self.overflowed:
            return False
        size = len(frame)
        if self._frames and self.queued_bytes + size > self.max_bytes:
            self.overflowed = True
            self._frames.clear()  # a client that is closed gets none of it; free the memory now
            self.queued_bytes = 0
            return False
        self._frames.append((frame, time.perf_counter()))
        self.queued_bytes += size
        self._ready.set()
        return True

    async def get(self) -> tuple[Frame, float]:
        """The next frame to write and when it was queued (it stops counting against the budget now)."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frame, queued_at = self._frames.popleft()
        self.queued_bytes -= len(frame)
        return frame, queued_at
