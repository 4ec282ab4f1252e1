"""A real model behind a gate a test can close: calls that start while it is closed wait, so a test
can hold the model busy for as long as it needs (no sleeps) and see who queues behind it."""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class Gated:
    """Wraps `model` so that its blocking `method` waits at the gate while it is closed; every other
    attribute (`sample_rate`, `warm_up`, ...) is the model's own. Records every call's argument."""

    def __init__(self, model: Any, method: str) -> None:
        self._model = model
        self._call = getattr(model, method)
        self._open = threading.Event()
        self._open.set()
        self._waiting = threading.Event()
        self.calls: list[Any] = []
        setattr(self, method, self._gated)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        self._waiting.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def held(self, timeout: float = 30.0) -> None:
        """Wait until a call is waiting at the closed gate."""
        if not await asyncio.to_thread(self._waiting.wait, timeout):
            raise TimeoutError("no call reached the gate")

    def _gated(self, arg: Any) -> Any:
        if not self._open.is_set():
            self._waiting.set()
            if not self._open.wait(120):
                raise TimeoutError("the test never opened the gate")
        self.calls.append(arg)
        return self._call(arg)
