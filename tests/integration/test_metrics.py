"""Prometheus pages (docs/protocol.md §3): the gateway's `/metrics` and each worker's own on METRICS_PORT.

What they must guarantee: pages a Prometheus client parses without name clashes, and series that
add up under `sum()` across gateway replicas, which is why worker series are exported only by the
workers themselves."""
from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import shared.bus
from gateway.__main__ import build_server
from gateway.metrics import TURN_STAGES, error_stage
from tests.support.admin import admin_get, wait_clean
from tests.support.stack import run_stack, wait_ready
from tests.support.ws import collect_until, connect, next_event
from voicepipe.embedded import free_port


async def scrape(url: str) -> list:
    """The families of one page, after checking what any Prometheus client would reject."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"duplicate families: {sorted(n for n in names if names.count(n) > 1)}"
    counters = {f.name for f in families if f.type in ("counter", "histogram", "summary")}
    gauges = {f.name for f in families if f.type == "gauge"}
    assert not counters & gauges, f"a gauge named like a counter's base: {counters & gauges}"
    assert not [n for n in names if n.endswith("_peak")], "peaks are Prometheus's to derive"
    samples = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
    assert len(samples) == len(set(samples)), "a sample appears twice"
    return families


def value(families: list, sample: str, **labels: str) -> float:
    """The one sample of that name whose labels include `labels`."""
    found = [s.value for f in families for s in f.samples if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0]


def test_error_stage_names_the_process_family():
    assert error_stage("bad_message") == "gateway"
    assert error_stage("not_ready") == "gateway"
    assert error_stage("llm_timeout") == "llm"
    assert error_stage("llm_error", "llm-host-12-ab12cd") == "llm"
    assert error_stage("rate_limited", "llm-host-12-ab12cd") == "llm"  # the orchestrator's pending-turn limit
    assert error_stage("stage_failed", "tts-host-12-ab12cd") == "tts"
    assert error_stage("bad_audio", "gateway-host-1-aa") == "gateway"


async def test_gateway_page_has_turn_latencies_and_errors(stack, fake_llm):
    ws, _ = await connect(stack.ws_url)
    await ws.send(json.dumps({"type": "text.input", "text": "Hello there"}))
    events, _ = await collect_until(ws, "response.done")
    typed = {key[: -len("_ms")] for key in events[-1]["metrics"]}
    assert {"transcript_to_first_token", "llm", "tts"} <= typed
    await ws.send(json.dumps({"type": "no.such.thing"}))
    assert (await next_event(ws))["code"] == "bad_message"
    await ws.send(b"\x00")  # half a sample
    assert (await next_event(ws))["code"] == "bad_audio"

    families = await scrape(f"{stack.http_url}/metrics")
    for stage in TURN_STAGES:
        count = value(families, "voicepipe_turn_stage_seconds_count", stage=stage)
        assert count == (1 if stage in typed else 0), stage
    assert 0 < value(families, "voicepipe_turn_stage_seconds_sum", stage="llm") < 30
    assert value(families, "voicepipe_turn_stage_seconds_bucket", stage="llm", le="+Inf") == 1
    assert value(families, "voicepipe_errors_total", stage="gateway", code="bad_message") == 1
    assert value(families, "voicepipe_errors_total", stage="gateway", code="bad_audio") == 1

    fake_llm.fail_status = 400  # the orchestrator reports llm_error over the bus, then ends the turn
    await ws.send(json.dumps({"type": "text.input", "text": "Again"}))
    events, _ = await collect_until(ws, "response.done")
    assert [e["code"] for e in events if e["type"] == "error"] == ["llm_error"]
    families = await scrape(f"{stack.http_url}/metrics")
    assert value(families, "voicepipe_errors_total", stage="llm", code="llm_error") == 1
    assert value(families, "voicepipe_turn_stage_seconds_count", stage="llm") == 2  # a failed reply's turn ends too
    assert value(families, "voicepipe_turn_stage_seconds_count", stage="tts") == 1
    assert value(families, "voicepipe_connections") == 1
    assert value(families, "voicepipe_connections_accepted_total") == 1
    assert value(families, "voicepipe_connections_rejected_total", reason="token") == 0
    assert value(families, "voicepipe_connections_closed_abusive_total", reason="slow_reader") == 0
    assert value(families, "voicepipe_client_frames_rate_limited_total", kind="text") == 0
    assert value(families, "voicepipe_pool_connections_max", pool="redis") == stack.settings.redis_max_connections
    assert value(families, "voicepipe_uptime_seconds") > 0
    assert value(families, "voicepipe_gateway_info", gateway_id=stack.gateway.gateway_id) == 1
    await ws.close()
    async with asyncio.timeout(5):
        while True:
            families = await scrape(f"{stack.http_url}/metrics")
            if value(families, "voicepipe_disconnect_events_published_total", reason="client_disconnect") == 1:
                break
            await asyncio.sleep(0.02)
    assert value(families, "voicepipe_connections") == 0
    assert value(families, "voicepipe_disconnect_events_published_total", reason="timeout") == 0
    assert value(families, "voicepipe_disconnect_event_publish_failures_total", reason="client_disconnect") == 0


@contextlib.asynccontextmanager
async def second_gateway(settings):
    """Another gateway process's server on the same Redis, in this process (its own registry)."""
    port = free_port()
    server = build_server(settings, "127.0.0.1", port)
    task = asyncio.create_task(server.serve(), name="second-gateway")
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=15)


async def open_sum(urls: list[str]) -> float:
    return sum([value(await scrape(f"{url}/metrics"), "voicepipe_connections") for url in urls])


async def test_two_gateways_add_up_and_workers_export_once(settings, redis_client, transcriber, voice, fake_llm):
    ports = {stage: free_port() for stage in ("vad_stt", "llm", "tts")}
    async with run_stack(
        settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url, metrics_ports=ports
    ) as stack, second_gateway(settings) as other:
        gateways = [stack.http_url, other]
        a1, started = await connect(stack.ws_url)
        a2, _ = await connect(stack.ws_url)
        b1, _ = await connect(other.replace("http", "ws") + "/v1/ws")
        await b1.send(json.dumps({"type": "text.input", "text": "Hello"}))
        await collect_until(b1, "response.done")
        assert await open_sum(gateways) == 3
        for url in gateways:  # nothing a sum over gateways could count twice
            families = await scrape(f"{url}/metrics")
            assert not [f.name for f in families if f.name.startswith(("voicepipe_worker", "voicepipe_llm_"))]
            assert not [s for f in families for s in f.samples if "worker_id" in s.labels]
        assert value(await scrape(f"{other}/metrics"), "voicepipe_turn_stage_seconds_count", stage="llm") == 1
        assert value(await scrape(f"{stack.http_url}/metrics"), "voicepipe_turn_stage_seconds_count", stage="llm") == 0

        await a1.close()
        await wait_clean(stack, started["conversation_id"])
        async with asyncio.timeout(5):
            while await open_sum(gateways) != 2:
                await asyncio.sleep(0.02)

        for stage, port in ports.items():
            worker = stack.workers[stage]
            families = await scrape(f"http://127.0.0.1:{port}/metrics")
            me = {"worker_id": worker.worker_id, "stage": stage}
            assert value(families, "voicepipe_worker_conversations", **me) == 2
            assert value(families, "voicepipe_worker_resources", **me, resource="conversations") == 2
            assert value(families, "voicepipe_worker_cleanup_seconds_count", **me) == 1
            assert value(families, "voicepipe_worker_cleanup_seconds_bucket", **me, le="+Inf") == 1
            assert value(families, "voicepipe_worker_disconnect_events_total", **me) >= 1
            assert value(families, "voicepipe_worker_stale_cleaned_total", **me) == 0
            assert value(families, "voicepipe_pool_connections_in_use", **me, pool="redis") >= 1  # its subscription
            assert all(s.labels.get("worker_id") == worker.worker_id for f in families for s in f.samples
                       if f.name.startswith("voicepipe_")), "every voicepipe series names its worker"
        llm = await scrape(f"http://127.0.0.1:{ports['llm']}/metrics")
        mine = {"worker_id": stack.workers["llm"].worker_id}
        assert value(llm, "voicepipe_llm_requests_total", **mine) == 1
        assert value(llm, "voicepipe_llm_failures_total", **mine) == 0
        assert value(llm, "voicepipe_llm_open_streams", **mine) == 0
        assert value(llm, "voicepipe_pool_connections_open", **mine, pool="llm_http") >= 1
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{ports['tts']}/nope")).status_code == 404
        for ws in (a2, b1):
            await ws.close()
    async with httpx.AsyncClient() as client:  # each worker's server stopped with its worker
        for port in ports.values():
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/metrics")


async def test_worker_page_counts_bus_drops_and_loop_restarts(settings, redis_client, transcriber, voice, fake_llm, monkeypatch):
    """What the worker's subscriber dropped, and its reader dying and being started again, are on
    the worker's own page with the figures /admin/workers reports."""
    marker = b"this payload makes decode itself crash"
    real_decode = shared.bus.decode

    def buggy_decode(data):
        if data == marker:
            raise RuntimeError("a bug in the decoder")
        return real_decode(data)

    monkeypatch.setattr(shared.bus, "decode", buggy_decode)
    port = free_port()
    async with run_stack(
        settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url, metrics_ports={"tts": port}
    ) as stack:
        tts = stack.workers["tts"]
        me = {"worker_id": tts.worker_id, "stage": "tts"}
        url = f"http://127.0.0.1:{port}/metrics"
        families = await scrape(url)
        assert value(families, "voicepipe_bus_messages_undecodable_total", **me) == 0
        for loop in ("heartbeat", "subscriber", "sweep"):
            assert value(families, "voicepipe_loop_restarts_total", **me, loop=loop) == 0

        for data in (b"", b"[" * 100_000, b"\x00\x00"):
            await redis_client.publish(tts.inbox, data)
        async with asyncio.timeout(10):
            while tts.bus_stats.undecodable < 3:
                await asyncio.sleep(0.01)
        await redis_client.publish(tts.inbox, marker)
        async with asyncio.timeout(10):  # restarted, and reading its inbox again
            while tts.loop_restarts.get("subscriber") != 1:
                await asyncio.sleep(0.01)
            while tts.bus_stats.undecodable == 3:
                await redis_client.publish(tts.inbox, b"")
                await asyncio.sleep(0.05)

        families = await scrape(url)
        undecodable = value(families, "voicepipe_bus_messages_undecodable_total", **me)
        assert undecodable >= 4
        assert value(families, "voicepipe_bus_messages_received_total", **me) >= undecodable + 1  # the marker too
        assert value(families, "voicepipe_bus_handler_failures_total", **me) == 0
        assert value(families, "voicepipe_loop_restarts_total", **me, loop="subscriber") == 1
        assert value(families, "voicepipe_loop_restarts_total", **me, loop="heartbeat") == 0
        workers = (await admin_get(stack, "/admin/workers"))["workers"]
        stats = next(w["stats"] for w in workers if w["worker_id"] == tts.worker_id)
        assert stats["loop_restarts"] == 1
        assert stats["bus_messages_undecodable"] >= undecodable  # the admin read comes later
