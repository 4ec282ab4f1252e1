"""A worker's own Prometheus `/metrics`, served on `METRICS_PORT` (0: off) by the worker itself.

Why each worker serves its own page: a worker's series exported once, by the worker, add up
correctly under `sum()`; when every gateway re-exported them from heartbeats, N gateways counted
each worker N times. Heartbeats still carry the same figures for `/admin/workers`.

Every series has the labels `worker_id` and `stage`. Figures the worker keeps anyway
(`WorkerStats`, its pools, `ChatClient.stats`) are read at scrape time by a collector, so the page,
the health line and the admin API never disagree (the bus subscriber's drops and the restarts of
the long-lived loops are the same counters `/admin/workers` shows); the cleanup duration is a real Histogram,
observed by `Worker.end_conversation`.

The page is served by a small asyncio server inside the worker's own event loop rather than by
prometheus-client's `start_http_server`: that one runs in a thread, and a scrape would then read
dicts the event loop is changing (a "dictionary changed size during iteration" away from a failed
scrape). In the loop a scrape sees a consistent state, and the server is one more task of the
worker's TaskGroup, so it stops with the worker. A port that cannot be bound stops the worker:
a misconfigured port should fail loudly at start, not leave a worker nobody can see."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import CONTENT_TYPE, pool_families
from workers.llm_orchestrator.llm_client import ChatClient
from workers.stats import CLEANUP_BUCKETS_MS

if TYPE_CHECKING:
    from workers.runtime import Worker

log = logging.getLogger("voicepipe.worker.metrics")

CLEANUP_BUCKETS_S = tuple(ms / 1000 for ms in CLEANUP_BUCKETS_MS)  # the heartbeat histogram's bounds
REQUEST_TIMEOUT_S = 5.0  # a scraper that has not sent its request by then is dropped
MAX_HEADER_LINES = 100
WORKER_LOOPS = ("heartbeat", "subscriber", "sweep")  # the worker's long-lived loops (workers/runtime.py), exported at 0 too
# ChatClient.stats keys -> counter name (without _total) and help
LLM_COUNTERS = {
    "requests": ("voicepipe_llm_requests", "Replies asked of the LLM server."),
    "retries": ("voicepipe_llm_retries", "Extra attempts before a first token (refused connects, HTTP 429/502/503)."),
    "failures": ("voicepipe_llm_failures", "Replies that failed (llm_unavailable, llm_timeout, llm_error)."),
    "closed_early": ("voicepipe_llm_closed_early", "LLM responses closed before the server finished (barge-in, disconnect)."),
    "connects": ("voicepipe_llm_connects", "TCP connections opened to the LLM server."),
}


class WorkerMetrics:
    """The series of one worker process, on a registry of its own (several workers share a test process)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.registry = CollectorRegistry()
        labels = {"worker_id": worker.worker_id, "stage": worker.stage}
        self.cleanup_seconds = Histogram(
            "voicepipe_worker_cleanup_seconds",
            "Time this worker took to release everything it held for one ended conversation.",
            list(labels),
            buckets=CLEANUP_BUCKETS_S,
            registry=self.registry,
        ).labels(**labels)
        self.registry.register(_WorkerCollector(worker))
        ProcessCollector(registry=self.registry)  # process_* series: memory, CPU, open files, start time
        self.port: int | None = None  # the bound port while serving

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self) -> None:
        """Serve GET /metrics on `METRICS_HOST`:`METRICS_PORT` until cancelled; returns at once when the port is 0."""
        settings = self._worker.settings
        if not settings.metrics_port:
            return
        handlers: set[asyncio.Task[None]] = set()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            handlers.add(task)
            try:
                await self._answer(reader, writer)
            except asyncio.CancelledError:
                # only the shutdown below cancels a handler, and the task ends here either way;
                # re-raised, asyncio's stream callback (3.11) logs the cancellation as an error
                pass
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_client, settings.metrics_host, settings.metrics_port)
        self.port = server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, self.port)
        try:
            await server.serve_forever()
        finally:
            server.close()
            for task in list(handlers):  # a scrape under way ends with the worker
                task.cancel()
            if handlers:
                await asyncio.wait(handlers, timeout=1)
            self.port = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = (await reader.readline()).split()
                for _ in range(MAX_HEADER_LINES):
                    if (await reader.readline()).strip() == b"":
                        break
            if len(request) < 2 or request[0] not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif request[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", self.render(), CONTENT_TYPE
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + (b"" if request[:1] == [b"HEAD"] else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:  # ValueError: a line past the reader's limit
            log.debug("metrics request dropped: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _WorkerCollector(Collector):
    """Figures the worker keeps anyway, read at scrape time (inside the worker's event loop)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        labels = {"worker_id": w.worker_id, "stage": w.stage}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help_, labels=names)
            family.add_metric(values, value)
            return family

        def counters(name: str, help_: str, label: str, counts: dict[str, float], keys: Iterable[str]) -> CounterMetricFamily:
            """One series per key of `keys` (0 where `counts` has none), labelled `label`."""
            family = CounterMetricFamily(name, help_, labels=[*names, label])
            for key in keys:
                family.add_metric([*values, key], counts.get(key, 0))
            return family

        s = w.stats
        yield gauge("voicepipe_worker_conversations", "Conversations this worker holds now.", len(w.conversation_ids()))
        resources = GaugeMetricFamily(
            "voicepipe_worker_resources", "Counts of what this worker holds, as its health line prints them.", labels=[*names, "resource"]
        )
        for resource, count in sorted(w.resources().items()):
            resources.add_metric([*values, resource], count)
        yield resources
        yield counter("voicepipe_worker_disconnect_events", "connection_disconnected events this worker received.", s.disconnect_events_received)
        yield counter(
            "voicepipe_worker_conversations_cleaned", "Conversations this worker released on their disconnect event.", s.conversations_cleaned
        )
        yield counter(
            "voicepipe_worker_stale_cleaned",
            "Conversations this worker's sweep released (a missed event, or a dead gateway's lease expired).",
            s.stale_cleaned,
        )
        yield counter("voicepipe_worker_sweeps", "Runs of this worker's stale sweep.", s.sweeps)
        bus = w.bus_stats
        yield counter("voicepipe_bus_messages_received", "Messages this worker's bus subscriber read.", bus.received)
        yield counter(
            "voicepipe_bus_messages_undecodable", "Messages on this worker's channels dropped as undecodable.", bus.undecodable
        )
        yield counter(
            "voicepipe_bus_handler_failures", "Messages this worker read whose handling failed (logged and skipped).", bus.handler_failures
        )
        yield counters(
            "voicepipe_loop_restarts",
            "Long-lived loops of this worker that ended and were started again.",
            "loop",
            w.loop_restarts,
            sorted({*WORKER_LOOPS, *w.loop_restarts}),
        )
        yield from pool_families(w.pools(), labels)
        adjusted = getattr(w, "end_adjusted", None)  # the VAD/STT worker's adaptive end of turn
        if adjusted is not None:
            yield counters(
                "voicepipe_vad_end_adjusted",
                "Pauses whose end-of-utterance silence the early transcript moved: shortened (a finished "
                "sentence or question) or extended (a clause left open).",
                "direction",
                adjusted,
                ("shortened", "extended"),
            )
        early = getattr(w, "early_transcripts", None)  # the VAD/STT worker's transcripts of a pause
        if early is not None:
            yield counters(
                "voicepipe_early_transcripts",
                "Pauses transcribed before the end of the utterance was decided: kept as the final transcript "
                "(final), or dropped because speech went on or the utterance ended otherwise (stale; whisper "
                "time spent for nothing).",
                "outcome",
                early,
                ("final", "stale"),
            )
        speculations = getattr(w, "speculations", None)  # the orchestrator's speculative replies
        if speculations is not None:
            yield counter(
                "voicepipe_speculative_replies_started",
                "Replies started on an early transcript, before the end of the user's turn was decided.",
                speculations.get("started", 0),
            )
            yield counters(
                "voicepipe_speculative_replies",
                "Speculative replies by outcome: confirmed (the turn ended with the same words; sent) or "
                "wasted (discarded unheard: the user spoke on, or the final transcript differed).",
                "outcome",
                speculations,
                ("confirmed", "wasted"),
            )
        wasted = getattr(w, "speculation_wasted_s", None)  # orchestrator (LLM stream time) and TTS (synthesis)
        if wasted is not None:
            yield counter(
                "voicepipe_speculation_wasted_seconds",
                "Model time spent on speculative replies that were discarded: the LLM stream open (orchestrator) "
                "or speech synthesized (TTS).",
                wasted,
            )
        chat = getattr(w, "chat", None)  # the orchestrator's LLM client (None before it loads)
        if isinstance(chat, ChatClient):
            yield gauge("voicepipe_llm_open_streams", "LLM responses open now.", chat.open_streams)
            for key, (name, help_) in LLM_COUNTERS.items():
                yield counter(name, help_, chat.stats.get(key, 0))
