"""Returning freed heap memory: trimmed only after conversations ended, never blocking the loop."""
from __future__ import annotations

import asyncio
import sys

import pytest

from shared import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_reaches_glibc():
    assert memory._malloc_trim() is not None
    assert isinstance(memory.trim(), bool)


async def test_the_heap_is_trimmed_only_after_conversations_ended_and_when_idle(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: (lambda pad: 1))
    ended, held = 0, 1
    loop = asyncio.create_task(memory.trim_loop(0.02, lambda: ended, lambda: held == 0))
    await asyncio.sleep(0.1)
    assert calls == []  # nothing ended: nothing to give back
    ended = 3
    await asyncio.sleep(0.1)
    assert calls == []  # a conversation is live: a trim would stall it
    held = 0
    await asyncio.sleep(0.1)
    assert len(calls) == 1  # once per change, not once per tick
    ended = 4
    await asyncio.sleep(0.1)
    assert len(calls) == 2
    loop.cancel()


async def test_a_zero_interval_turns_trimming_off():
    await asyncio.wait_for(memory.trim_loop(0, lambda: 1, lambda: True), 1)
