"""`GET /metrics`: Prometheus text exposition of the gateway and of every live worker (from heartbeats)."""
from __future__ import annotations

import time

from gateway.hub import Gateway


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items())
    return "{" + inner + "}"


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def declare(self, family: str, kind: str, help_: str) -> None:
        if family not in self._declared:
            self._declared.add(family)
            self.lines += [f"# HELP {family} {help_}", f"# TYPE {family} {kind}"]

    def add(self, name: str, kind: str, help_: str, value: float, **labels: str) -> None:
        self.declare(name, kind, help_)
        self.sample(name, value, **labels)

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(gateway: Gateway) -> str:
    s = gateway.stats
    out = Exposition()
    gid = gateway.gateway_id
    out.add("voicepipe_connections", "gauge", "Open client connections.", s.current, gateway=gid)
    out.add("voicepipe_connections_peak", "gauge", "Most open client connections at once.", s.peak, gateway=gid)
    out.add("voicepipe_connections_total", "counter", "Client connections accepted.", s.total, gateway=gid)
    out.add("voicepipe_connections_rejected_total", "counter", "Client connections refused.", s.rejected, gateway=gid)
    out.add("voicepipe_disconnect_events_published_total", "counter", "connection_disconnected events published.", s.published, gateway=gid)
    out.add("voicepipe_disconnect_event_publish_failures_total", "counter", "connection_disconnected events that could not be published.", s.publish_failures, gateway=gid)
    out.add("voicepipe_stale_conversations_total", "counter", "Conversations ended by the gateway's stale sweep.", s.stale_cleaned, gateway=gid)
    for reason in ("barge_in", "cancelled"):
        out.add("voicepipe_replies_interrupted_total", "counter", "Replies interrupted, by reason.", s.interrupted.get(reason, 0), gateway=gid, reason=reason)
    out.add("voicepipe_uptime_seconds", "gauge", "Seconds since the gateway started.", round(time.monotonic() - gateway.started, 1), gateway=gid)
    directory = gateway.directory.workers
    for stage, workers in directory.items():
        out.add("voicepipe_stage_workers", "gauge", "Live workers per stage.", len(workers), stage=stage)
    everyone = [(stage, w) for stage, workers in directory.items() for w in workers]
    gauges = [
        ("voicepipe_worker_conversations", "gauge", "Conversations a worker holds.", lambda w: w.conversations),
        ("voicepipe_worker_conversations_peak", "gauge", "Most conversations a worker held.", lambda w: w.stats.get("peak_conversations", 0)),
        ("voicepipe_worker_disconnect_events_total", "counter", "connection_disconnected events a worker received.", lambda w: w.stats.get("disconnect_events_received", 0)),
        ("voicepipe_worker_stale_cleaned_total", "counter", "Conversations a worker's sweep cleaned.", lambda w: w.stats.get("stale_cleaned", 0)),
    ]
    for name, kind, help_, value in gauges:
        for stage, w in everyone:
            out.add(name, kind, help_, value(w), worker_id=w.worker_id, stage=stage)
    if everyone:
        out.declare("voicepipe_worker_cleanup_seconds", "histogram", "Time a worker took to release one conversation.")
    for stage, w in everyone:
        labels = {"worker_id": w.worker_id, "stage": stage}
        for bound, count in (w.stats.get("cleanup_ms_buckets") or {}).items():
            le = bound if bound == "+Inf" else str(float(bound) / 1000)
            out.sample("voicepipe_worker_cleanup_seconds_bucket", count, **labels, le=le)
        out.sample("voicepipe_worker_cleanup_seconds_sum", w.stats.get("cleanup_ms_sum", 0) / 1000, **labels)
        out.sample("voicepipe_worker_cleanup_seconds_count", w.stats.get("cleanup_count", 0), **labels)
    return out.text()
