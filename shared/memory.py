"""Handing freed heap memory back to the operating system.

glibc's malloc keeps what a process frees for reuse, so a burst of connections leaves the resident
size at its high-water mark for good, which looks exactly like a leak to anyone watching RSS.
Once conversations have ended and the process holds none, it trims its heap (`malloc_trim`), checked
every `MEMORY_TRIM_INTERVAL_S`. Only when idle: a trim holds the allocator's lock for 5-20 ms, which
would stall a live conversation's event loop. A process that is never idle keeps its working set,
which is not a leak. Elsewhere than glibc (musl, macOS) this is a no-op."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import cache

log = logging.getLogger("voicepipe.memory")


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Return free heap memory to the OS; whether anything was released."""
    malloc_trim = _malloc_trim()
    return bool(malloc_trim(0)) if malloc_trim is not None else False


async def trim_loop(interval_s: float, ended: Callable[[], int], idle: Callable[[], bool]) -> None:
    """Every `interval_s`, trim the heap if `ended()` (a count of ended conversations) has moved
    since the last trim and `idle()` says no conversation is held."""
    if interval_s <= 0 or _malloc_trim() is None:
        return
    last = ended()
    while True:
        await asyncio.sleep(interval_s)
        if (now := ended()) != last and idle():
            last = now
            await asyncio.to_thread(trim)
