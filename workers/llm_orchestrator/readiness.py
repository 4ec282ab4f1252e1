"""Whether this orchestrator's LLM server answers, for the gateway's `/readyz`.

The gateway never talks to the LLM server; the orchestrator does, so it is the one to say whether
the server is there. It asks `GET {LLM_BASE_URL}/models` (every OpenAI-compatible server has it,
and it costs no generation) with a short timeout: at start, every `LLM_CHECK_INTERVAL_S` while the
answer is yes, every second while it is no, and at once after a reply failed as unreachable or
timed out. A reply that streamed to its end is proof enough, and counts as a yes.

A busy server is not a missing one, and the check must not make it busier. llama-cpp-python's
server (run with `--interrupt_requests false`) queues every request behind the reply it is
generating, `/models` included, and each queued request holds one of its worker threads until its
turn, even after the client gave up; enough of them starve the thread the running reply needs, and
the server stops. So: no check while this orchestrator has a reply streaming (the reply is the
check: it ends answered, or failed and then checked); after a check that timed out (the server took
the connection, it is there but slow) the next waits the full interval, never the one-second retry
meant for a refused connection; and a timed-out check keeps a yes while the server showed life (a
check answered or a reply finished) within `busy_grace_s` (the reply read timeout). A refused or
failed connection, an error status, or a server silent for longer is a no.

The verdict travels in the worker's heartbeat as `llm_ok`; only a transition is logged, with the
exception's type (the URL can carry credentials and stays out of the log line)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from workers.llm_orchestrator.llm_client import LlmTimeout

log = logging.getLogger("voicepipe.llm")

RETRY_S = 1.0  # between checks while the server does not answer
CHECK_TIMEOUT_S = 2.0  # a server slower than this to list its models is not ready for a voice reply


class LlmReadiness:
    def __init__(
        self,
        check: Callable[[float], Awaitable[None]],
        interval_s: float = 5.0,
        timeout_s: float = CHECK_TIMEOUT_S,
        busy_grace_s: float = 30.0,
        streaming: Callable[[], int] = lambda: 0,
    ) -> None:
        self._check = check  # raises unless the server answers 2xx within its timeout (LlmTimeout: too slow)
        self.interval_s = max(0.1, interval_s)
        self.timeout_s = timeout_s
        self.busy_grace_s = busy_grace_s
        self._streaming = streaming  # replies this process has open upstream now
        self._slow = False  # the last check timed out: do not come back before the full interval
        self.ok: bool | None = None  # None: not asked yet
        self.checks = 0
        self.busy = 0  # checks that timed out while the server was known to be alive (kept as a yes)
        self._alive_at = float("-inf")  # time.monotonic() of the last sign of life
        self._wake = asyncio.Event()

    async def check_now(self) -> bool:
        if self._streaming():
            return bool(self.ok)  # a reply is under way: it will tell (answered / failed)
        self.checks += 1
        self._slow = False
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):  # the check's own timeout, bounded again
                await self._check(self.timeout_s)
        except asyncio.CancelledError:
            raise
        except (LlmTimeout, TimeoutError) as exc:
            self._slow = True
            if self.ok and time.monotonic() - self._alive_at < self.busy_grace_s:
                self.busy += 1
                log.debug("LLM server is busy (its model list took over %.1f s)", self.timeout_s)
            else:
                self._set(False, type(exc).__name__)
        except Exception as exc:
            self._set(False, type(exc).__name__)
        else:
            self._set(True)
        return bool(self.ok)

    def answered(self) -> None:
        """A reply streamed to its end: the server answers."""
        self._set(True)

    def failed(self) -> None:
        """A reply could not reach the server (unreachable, timed out): check again now."""
        self._wake.set()

    def _set(self, ok: bool, why: str = "") -> None:
        if ok:
            self._alive_at = time.monotonic()
        if ok != self.ok:
            if ok:
                log.info("LLM server answers")
            else:
                log.warning("LLM server does not answer (%s); /readyz says llm_server is missing", why)
        self.ok = ok

    def next_wait_s(self) -> float:
        """Until the next check: the interval, or the short retry after a refused connection."""
        return self.interval_s if self.ok or self._slow else min(RETRY_S, self.interval_s)

    async def run(self) -> None:
        """Check for as long as the process lives (under `keep_running`)."""
        while True:
            try:
                async with asyncio.timeout(self.next_wait_s()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.check_now()
