"""`GET /metrics` of one gateway (docs/protocol.md §3), written with prometheus-client.

Why it is built this way:
- One `CollectorRegistry` per `Gateway`, never the library's global one: several gateways live in
  one test process, and a global registry would refuse the second (or mix their figures).
- Only this gateway's own series. Workers serve their own `/metrics` (workers/metrics.py); when
  every gateway re-exported every worker from its heartbeat, `sum()` over N gateways counted each
  worker N times. Here every series belongs to this process alone, so summing over the replicas
  gives the deployment's figure (which is also why no series carries a per-process id: the scrape
  target's `instance` label tells replicas apart; `voicepipe_gateway_info` maps it to the id in logs).
- What the admin API also reports (`gateway.stats`, the Redis pool) is read at scrape time by a
  collector, so `/metrics` and `/admin/resources/stats` cannot disagree and nothing is counted twice;
  what exists only as an event (a turn's latencies, an `error` sent) is a real Counter or Histogram,
  observed by a hook in gateway/conversation.py.
- Base units (seconds), `_total` on counters, no `_peak` gauges (`max_over_time` gives peaks), and
  no gauge named like a counter's base (`voicepipe_connections` vs `voicepipe_connections_accepted`)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared.bus import pool_stats
from shared.metrics import CONTENT_TYPE, pool_families
from shared.stages import STAGES

if TYPE_CHECKING:
    from gateway.hub import Gateway

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "error_stage"]

# docs/protocol.md §1.1, without `_ms`: the keys of `response.done.metrics`
TURN_STAGES = (
    "speech_end_to_transcript",
    "transcript_to_first_token",
    "first_token_to_first_audio",
    "speech_end_to_first_audio",
    "stt",
    "llm",
    "tts",
)
# from a few ms (a typed turn's first token) to a long reply's whole synthesis
TURN_STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
DISCONNECT_REASONS = ("client_disconnect", "server_error", "timeout")  # §2: always exported, 0 or not
INTERRUPT_REASONS = ("barge_in", "cancelled", "truncated")
REJECT_REASONS = ("token", "origin", "limit", "bus_unavailable")


def error_stage(code: str, source: str | None = None) -> str:
    """The process family an `error` event came from: the stage of the worker that sent it over the
    bus (worker ids start with their stage), else by its code (`llm_*`), else the gateway itself."""
    if source:
        prefix = source.split("-", 1)[0]
        if prefix in STAGES:
            return prefix
    if code.startswith("llm_"):
        return "llm"
    return "gateway"


class GatewayMetrics:
    """The series of one gateway process, on a registry of its own."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.turn_stage = Histogram(
            "voicepipe_turn_stage_seconds",
            "Per-turn latencies of response.done (docs/protocol.md §1.1), by stage, observed when the turn ends.",
            ["stage"],
            buckets=TURN_STAGE_BUCKETS,
            registry=self.registry,
        )
        for stage in TURN_STAGES:  # every stage's series exists from the start, 0 until observed
            self.turn_stage.labels(stage)
        self.errors = Counter(
            "voicepipe_errors",
            "error events sent to clients, by the process family that produced them (stage) and code.",
            ["stage", "code"],
            registry=self.registry,
        )
        self.turns_resumed_early = Counter(
            "voicepipe_turns_resumed_early",
            "Spoken turns that began within 1 s after the previous reply's first audio: the user had not "
            "finished, so the end of their turn was decided too early (adaptive end of turn).",
            registry=self.registry,
        )
        self.registry.register(_GatewayCollector(gateway))
        ProcessCollector(registry=self.registry)  # process_* series: memory, CPU, open files, start time

    def turn_done(self, metrics: Mapping[str, float]) -> None:
        """A turn ended with `response.done`: observe its §1.1 figures (ms) in seconds."""
        for key, ms in metrics.items():
            if key.endswith("_ms"):
                self.turn_stage.labels(key[:-3]).observe(ms / 1000)

    def error_sent(self, code: str, source: str | None = None) -> None:
        """An `error` event went to a client; `source` is the bus message's sender, if a worker's."""
        self.errors.labels(error_stage(code, source), code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GatewayCollector(Collector):
    """Figures the gateway keeps anyway (for the admin API), read when Prometheus scrapes."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        g = self._gateway
        s = g.stats
        yield InfoMetricFamily("voicepipe_gateway", "This gateway's id, as its log lines and bus messages name it.", value={"gateway_id": g.gateway_id})
        yield GaugeMetricFamily("voicepipe_connections", "Client WebSocket connections open now.", value=s.current)
        yield CounterMetricFamily("voicepipe_connections_accepted", "Client connections accepted (a conversation opened).", value=s.total)
        yield _by_reason(
            "voicepipe_connections_rejected", "Client connections refused before the upgrade, by cause.",
            s.rejected_by, REJECT_REASONS,
        )
        closed = CounterMetricFamily("voicepipe_connections_closed_abusive", "Clients closed by the gateway for their behaviour, by cause.", labels=["reason"])
        closed.add_metric(["slow_reader"], s.closed_slow)
        closed.add_metric(["rate_limited"], s.closed_rate_limited)
        yield closed
        frames = CounterMetricFamily("voicepipe_client_frames_rate_limited", "Client frames dropped over the rate limits, by kind.", labels=["kind"])
        for kind in sorted({"text", "audio", *s.rate_limited_frames}):
            frames.add_metric([kind], s.rate_limited_frames.get(kind, 0))
        yield frames
        yield CounterMetricFamily(
            "voicepipe_connection_slots_repaired",
            "Per-client connection slots of dead gateways that this gateway deleted.",
            value=g.limits.repaired,
        )
        bus = g.bus_stats.summary()
        yield CounterMetricFamily("voicepipe_bus_messages_undecodable", "Messages on this gateway's inbox dropped as undecodable.", value=bus["bus_messages_undecodable"])
        yield CounterMetricFamily("voicepipe_bus_handler_failures", "Inbox messages whose handling failed (logged and skipped).", value=bus["bus_handler_failures"])
        restarts = CounterMetricFamily("voicepipe_loop_restarts", "Long-lived loops of this gateway that ended and were started again.", labels=["loop"])
        for loop, count in sorted(g.loop_restarts.items()):
            restarts.add_metric([loop], count)
        yield restarts
        yield _by_reason(
            "voicepipe_disconnect_events_published", "connection_disconnected events published, by reason.",
            s.published_by_reason, DISCONNECT_REASONS,
        )
        yield _by_reason(
            "voicepipe_disconnect_event_publish_failures",
            "connection_disconnected events that could not be published after every retry, by reason.",
            s.failures_by_reason, DISCONNECT_REASONS,
        )
        yield _by_reason("voicepipe_replies_interrupted", "Replies interrupted, by reason.", s.interrupted, INTERRUPT_REASONS)
        yield CounterMetricFamily("voicepipe_stale_sweeps", "Runs of this gateway's sweep for expired routing leases.", value=s.stale_sweeps)
        yield CounterMetricFamily(
            "voicepipe_stale_conversations",
            "Conversations whose gateway died, ended by this gateway's sweep (it published their event).",
            value=s.stale_cleaned,
        )
        yield from pool_families({"redis": pool_stats(g.redis)})
        yield GaugeMetricFamily("voicepipe_uptime_seconds", "Seconds since this gateway started.", value=time.monotonic() - g.started)


def _by_reason(name: str, help_: str, counts: Mapping[str, int], always: tuple[str, ...]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_, labels=["reason"])
    for reason in sorted({*always, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family
