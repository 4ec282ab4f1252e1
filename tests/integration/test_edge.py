"""The gateway's edge over real sockets (docs/protocol.md §1 "Connecting", "Rate limits", §1.2, §3):
tokens, origins, per-client limits, hostile input, resume tokens and correlation ids."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
from urllib.parse import quote

import httpx
import pytest
import websockets
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import make_settings
from tests.support.admin import KEY, admin_get, wait_clean
from tests.support.stack import run_stack, wait_ready
from tests.support.ws import collect_until, connect, next_event, raw_handshake, refused_status, wait_closed
from voicepipe.client import VoiceClient

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture
async def token_stack(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, client_tokens=["sesame-1", "sésame-ü"], allowed_origins=["https://voice.example"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        yield stack


# ---- tokens and origins


@pytest.mark.parametrize("place", ["query", "header", "subprotocol"])
async def test_a_token_is_accepted_in_all_three_places(token_stack, place):
    async with VoiceClient(token_stack.ws_url, token="sesame-1", token_in=place) as client:
        assert client.session["type"] == "session.started"
        assert client.ws.subprotocol == ("voicepipe.v1" if place == "subprotocol" else None)
        await client.send_json({"type": "ping"})
        assert (await next_event(client.ws))["type"] == "pong"


async def test_a_non_ascii_token_works_anywhere_a_client_can_send_it(token_stack):
    ws, _ = await connect(f"{token_stack.ws_url}?token={quote('sésame-ü')}")
    await ws.close()
    status, _ = await raw_handshake(token_stack.port, b"/v1/ws", [(b"Authorization", "Bearer sésame-ü".encode())])
    assert status == 101
    offered = [(b"Sec-WebSocket-Protocol", "voicepipe.v1, token.sésame-ü".encode())]
    status, headers = await raw_handshake(token_stack.port, b"/v1/ws", offered)
    assert (status, headers["sec-websocket-protocol"]) == (101, "voicepipe.v1")


async def test_wrong_missing_and_non_ascii_tokens_get_403_before_the_upgrade(token_stack):
    url = token_stack.ws_url
    refusals = [
        await refused_status(url),
        await refused_status(f"{url}?token=wrong"),
        await refused_status(f"{url}?token={quote('ünknown-☃')}"),
        await refused_status(url, additional_headers={"Authorization": "Bearer wrong"}),
        await refused_status(url, subprotocols=["voicepipe.v1", "token.wrong"]),
        await refused_status(url, additional_headers={"Authorization": "Basic sesame-1"}),
        await raw_handshake(token_stack.port, b"/v1/ws", [(b"Authorization", "Bearer ünknown".encode())]),
        await raw_handshake(token_stack.port, b"/v1/ws", [(b"Authorization", b"Bearer \xff\xfe\x80")]),
        await raw_handshake(token_stack.port, b"/v1/ws?token=%FF%FE", []),
        # not an HTTP token, so no browser sends one, but a socket can: refused like a wrong token
        await raw_handshake(token_stack.port, b"/v1/ws", [(b"Sec-WebSocket-Protocol", "voicepipe.v1, token.☃".encode())]),
        await raw_handshake(token_stack.port, b"/v1/ws", [(b"Sec-WebSocket-Protocol", b"voicepipe.v1, token.\xff\xfe")]),
    ]
    assert [status for status, _ in refusals] == [403] * len(refusals)
    assert all(UUID4.fullmatch(headers["x-correlation-id"]) for _, headers in refusals)
    stats = await admin_get(token_stack, "/admin/resources/stats")
    assert stats["connections"]["rejected"] == len(refusals) == stats["connections"]["rejected_by"]["token"]
    assert stats["connections"]["total"] == 0  # nothing was opened for any of them


async def test_an_origin_not_allowed_gets_403_and_a_long_one_breaks_nothing(token_stack):
    url = f"{token_stack.ws_url}?token=sesame-1"
    assert (await refused_status(url, origin="https://evil.example"))[0] == 403
    assert (await refused_status(url, origin="https://" + "e" * 120 + ".example"))[0] == 403
    ws, _ = await connect(url, origin="https://voice.example")
    await ws.close()
    ws, _ = await connect(url)  # no Origin at all: a CLI or server client
    await ws.close()
    stats = await admin_get(token_stack, "/admin/resources/stats")
    assert stats["connections"]["rejected_by"] == {"origin": 2}


async def test_the_subprotocol_is_answered_without_tokens_too(stack):
    ws, _ = await connect(stack.ws_url, subprotocols=["voicepipe.v1"])
    assert ws.subprotocol == "voicepipe.v1"
    await ws.close()
    ws, _ = await connect(stack.ws_url)
    assert ws.subprotocol is None
    await ws.close()
    # with no tokens configured, an entry that is not an HTTP token is ignored like any unknown one
    offered = [(b"Sec-WebSocket-Protocol", "voicepipe.v1, token.☃".encode())]
    status, headers = await raw_handshake(stack.port, b"/v1/ws", offered)
    assert (status, headers["sec-websocket-protocol"]) == (101, "voicepipe.v1")


async def test_admin_keys_and_headers_with_any_bytes_never_give_a_500(stack):
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        for key in ("ключ".encode(), b"\xff\xfe", "test-admin-key\u00e9".encode(), b""):
            answer = await client.get("/admin/resources/stats", headers={"X-API-Key": key})
            assert answer.status_code == 401, key
        assert (await client.get("/admin/resources/stats", headers=KEY)).status_code == 200
        for value in (b"\xff\xfe", "café".encode(), b"x" * 129, b"a b", b"<script>"):
            answer = await client.get("/healthz", headers={"X-Correlation-ID": value})
            assert answer.status_code == 200 and UUID4.fullmatch(answer.headers["x-correlation-id"]), value
        answer = await client.get("/healthz", headers={"X-Correlation-ID": "edge:test-1.ok_2"})
        assert answer.headers["x-correlation-id"] == "edge:test-1.ok_2"
    _, started = await connect(stack.ws_url, additional_headers={"X-Correlation-ID": "x" * 200})
    assert UUID4.fullmatch(started["correlation_id"])
    status, _ = await raw_handshake(stack.port, b"/v1/ws", [(b"X-Correlation-ID", b"\xff\xfe")])
    assert status == 101


async def test_a_handshake_too_big_to_parse_is_answered_at_once(stack):
    """A header line over 8 KiB: websockets refuses it with 431, which must reach the client
    (not hang until it gives up); the gateway keeps serving."""
    status, _ = await raw_handshake(stack.port, b"/v1/ws", [(b"X-Big", b"a" * 20000)])
    assert status == 431
    many = [(b"X-H%d" % i, b"1") for i in range(200)]
    assert (await raw_handshake(stack.port, b"/v1/ws", many))[0] == 431
    ws, _ = await connect(stack.ws_url)
    await ws.send(json.dumps({"type": "ping"}))
    assert (await next_event(ws))["type"] == "pong"
    await ws.close()


async def test_readyz_names_what_is_missing_but_no_exception_text(stack, monkeypatch):
    async def broken_ping(*args, **kwargs):
        raise RedisConnectionError("Error connecting to redis://:hunter2@10.0.0.1:6379: secret detail")

    monkeypatch.setattr(stack.gateway.redis, "ping", broken_ping)
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        answer = await client.get("/readyz")
    assert answer.status_code == 503 and answer.json() == {"status": "not_ready", "missing": ["redis"]}


# ---- per-client connection limits (one gateway; tests/e2e/test_edge_processes.py has several)


async def test_over_the_limit_is_429_with_retry_after_and_every_ending_frees_its_slot(
    redis_url, redis_client, transcriber, voice, fake_llm
):
    settings = make_settings(redis_url, max_connections_per_client=2, stale_timeout_s=3.0)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        limits = stack.gateway.limits

        async def held(count: int) -> None:
            async with asyncio.timeout(5):  # a slot is released in the socket's own cleanup
                while limits.held != count:
                    await asyncio.sleep(0.01)

        first, _ = await connect(stack.ws_url)
        second, _ = await connect(stack.ws_url)
        status, headers = await refused_status(stack.ws_url)
        assert status == 429 and headers["retry-after"] == "3"
        await first.close()
        await held(1)
        refused_resume = await websockets.connect(f"{stack.ws_url}?conversation_id=nope&resume_token=x")
        assert await wait_closed(refused_resume) == 4404
        await held(1)
        third, _ = await connect(stack.ws_url)
        assert (await refused_status(stack.ws_url))[0] == 429
        for ws in (second, third):
            await ws.close()
        await held(0)
        stats = await admin_get(stack, "/admin/resources/stats")
        assert stats["connections"]["rejected_by"] == {"limit": 2}
        assert stats["connection_limit"] == {"max_per_client": 2, "slots_held": 0}
        assert not [k async for k in redis_client.scan_iter(match=f"{settings.namespace}:client:*")]


async def test_forwarded_addresses_count_only_from_trusted_proxies(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, max_connections_per_client=1, trusted_proxies=["127.0.0.1"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        def via(chain: str) -> dict:
            return {"additional_headers": {"X-Forwarded-For": chain}}

        ws_a, _ = await connect(stack.ws_url, **via("198.51.100.1"))
        ws_b, _ = await connect(stack.ws_url, **via("198.51.100.2"))  # another client behind the same proxy
        assert (await refused_status(stack.ws_url, **via("198.51.100.1")))[0] == 429
        # a client cannot escape its limit by prepending addresses of its own
        assert (await refused_status(stack.ws_url, **via("6.6.6.6, 198.51.100.1")))[0] == 429
        for ws in (ws_a, ws_b):
            await ws.close()


async def test_without_trusted_proxies_forwarded_for_is_ignored(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, max_connections_per_client=1)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        ws, _ = await connect(stack.ws_url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
        assert (await refused_status(stack.ws_url, additional_headers={"X-Forwarded-For": "198.51.100.9"}))[0] == 429
        await ws.close()


# ---- hostile input


HOSTILE = [
    # (name, frames to send, expected error code or None)
    ("nested 30,000 deep", ["[" * 30000 + "]" * 30000], "bad_message"),
    ("nested objects", ['{"a":' * 10000 + "1" + "}" * 10000], "bad_message"),
    ("65 fields", [json.dumps({"type": "ping", **{f"f{i}": i for i in range(64)}})], "bad_message"),
    ("huge exponent", ['{"type": "ping", "n": 1e999999}'], "bad_message"),
    ("5,000-digit integer", ['{"type": "ping", "n": ' + "7" * 5000 + "}"], "bad_message"),
    ("NaN", ['{"type": "ping", "n": NaN}'], "bad_message"),
    ("type is a number", ['{"type": 5}'], "bad_message"),
    ("type is null", ['{"type": null}'], "bad_message"),
    ("text is a list", ['{"type": "text.input", "text": ["hi"]}'], "bad_message"),
    ("text too long", [json.dumps({"type": "text.input", "text": "a" * 8001})], "bad_message"),
    ("lone surrogate", ['{"type": "text.input", "text": "\\ud800"}'], "bad_message"),
    ("not an object", ["[1, 2, 3]"], "bad_message"),
    ("empty frame", [""], "bad_message"),
    ("60 KiB unknown type", [json.dumps({"type": "z" * 60000})], "bad_message"),
    ("odd-length audio", [bytes(641)], "bad_audio"),
    ("a burst of text over the rate", [json.dumps({"type": "ping"})] * 60, "rate_limited"),
]


async def _pong_eventually(ws, timeout: float = 10.0) -> None:
    """Ping until a pong comes back: the positive marker that the connection stays (a ping may
    itself be dropped while the rate bucket refills, so it is repeated)."""
    async with asyncio.timeout(timeout):
        while True:
            await ws.send(json.dumps({"type": "ping"}))
            try:
                async with asyncio.timeout(0.25):
                    while (await next_event(ws))["type"] != "pong":
                        pass
                return
            except TimeoutError:
                continue


async def _flood(ws, frame) -> tuple[list[dict], int]:
    """Send `frame` as fast as the socket takes it until the server closes; (events, close code)."""
    events: list[dict] = []

    async def read() -> int:
        try:
            async for message in ws:
                if isinstance(message, str):
                    events.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        return ws.close_code

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(20):
            while not reader.done():
                try:
                    await ws.send(frame)
                except websockets.ConnectionClosed:
                    break
                await asyncio.sleep(0)
            code = await reader
    finally:
        reader.cancel()
    return events, code


async def test_hostile_input_table_then_a_normal_turn(redis_url, redis_client, transcriber, voice, fake_llm, caplog):
    settings = make_settings(redis_url, max_messages_per_s=20, rate_limit_close_s=1.0, audio_realtime_factor=4.0)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        for name, frames, code in HOSTILE:
            ws, _ = await connect(stack.ws_url)
            for frame in frames:
                await ws.send(frame)
            async with asyncio.timeout(10):
                while (error := await next_event(ws))["type"] != "error":
                    pass  # pongs of the pings that were within the rate
            assert error["code"] == code, (name, error)
            assert len(error["message"]) <= 120 and "z" * 41 not in error["message"], (name, error["message"][:200])
            await _pong_eventually(ws)  # the connection stays
            await ws.close()
            assert ws.close_code == 1000, name  # the server never closed it

        # floods: told first, then closed with 1008 (policy), never 1011
        for name, frame in (("text flood", json.dumps({"type": "ping"})), ("audio flood", bytes(640))):
            ws, _ = await connect(stack.ws_url)
            events, close_code = await _flood(ws, frame)
            assert close_code == 1008, name
            assert [e["code"] for e in events if e["type"] == "error"][:1] == ["rate_limited"], name

        # bigger than 64 KiB is 1009 (the frame limit); invalid UTF-8 in a text frame is 1007 (RFC 6455)
        ws, _ = await connect(stack.ws_url)
        await ws.send("x" * 70000)
        assert await wait_closed(ws) == 1009
        ws, _ = await connect(stack.ws_url)
        await ws.send(b"\xff\xfe{}", text=True)
        assert await wait_closed(ws) == 1007

        # and the same gateway still serves a normal typed turn (the in-process workers' heartbeats
        # share the floods' event loop; wait until they are live, as a client's retry would)
        await wait_ready(stack.http_url)
        ws, _ = await connect(stack.ws_url)
        await ws.send(json.dumps({"type": "text.input", "text": "What is the capital of France?"}))
        events, audio = await collect_until(ws, "response.done")
        assert events[-1]["text"] == fake_llm.reply and audio
        await ws.close()
        stats = await admin_get(stack, "/admin/resources/stats")
        assert stats["connections"]["closed_rate_limited"] == 2
        assert stats["rate_limited_frames"]["text"] > 0 and stats["rate_limited_frames"]["audio"] > 0
        assert stats["disconnect_events"]["by_reason"].get("server_error", 0) == 0
    # hostile input is the client's problem: no ERROR line and no traceback for any of it
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_client_that_does_not_read_is_closed_1008_and_counted(redis_url, redis_client, transcriber, voice, fake_llm):
    """The outbound budget, through the real session: the socket's writes never complete."""
    settings = make_settings(redis_url, max_outbound_bytes=1000)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        ws, started = await connect(stack.ws_url)
        websocket = stack.gateway.conversations[started["conversation_id"]].wire.socket.websocket
        stuck = asyncio.Event()

        async def never_writes(*args, **kwargs):
            await stuck.wait()

        websocket.send_text = never_writes  # what a full TCP window looks like from here
        websocket.send_bytes = never_writes
        for _ in range(90):  # within the rate; 90 pongs are 1440 bytes
            await ws.send(json.dumps({"type": "ping"}))
        code = await wait_closed(ws)
        stuck.set()
        assert code == 1008
        stats = await admin_get(stack, "/admin/resources/stats")
        assert stats["connections"]["closed_slow"] == 1


async def test_a_client_that_pings_without_reading_is_dropped(stack):
    """Pongs bypass the app's outbound budget; a peer that lets them pile up is cut off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101")
    writer.transport.pause_reading()  # never read again
    mask = os.urandom(4)
    pings = (bytes([0x89, 0x84]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"ping"))) * 100_000
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(30):
            for _ in range(100):  # 100 MB at most; the gateway gives up long before
                writer.write(pings)
                await writer.drain()
    writer.transport.abort()
    async with asyncio.timeout(10):
        while stack.gateway.conversations:
            await asyncio.sleep(0.01)
    # in-process, the flood kept the one event loop busy long enough for the test workers' 2 s
    # heartbeats to lapse: wait until they are live again, then everyone else is served as before
    await wait_ready(stack.http_url)
    ws, _ = await connect(stack.ws_url)
    await ws.send(json.dumps({"type": "ping"}))
    assert (await next_event(ws))["type"] == "pong"
    await ws.close()


# ---- resume tokens


async def test_resume_rotates_the_token(stack, fake_llm):
    ws, first = await connect(stack.ws_url)
    await ws.close()
    cid = first["conversation_id"]
    await wait_clean(stack, cid)
    ws, second = await connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={first['resume_token']}")
    assert second["resumed"] and second["conversation_id"] == cid
    assert second["resume_token"] != first["resume_token"]
    await ws.close()
    await wait_clean(stack, cid)
    stale = await websockets.connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={first['resume_token']}")
    assert (json.loads(await stale.recv()))["code"] == "unknown_conversation"
    assert await wait_closed(stale) == 4404
    ws, third = await connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={second['resume_token']}")
    assert third["resumed"] and third["resume_token"] not in (first["resume_token"], second["resume_token"])
    await ws.close()


@pytest.mark.parametrize("old_socket", ["open", "closed"])
async def test_of_two_concurrent_resumes_exactly_one_wins(stack, fake_llm, old_socket):
    fake_llm.echo = True
    old, started = await connect(stack.ws_url)
    await old.send(json.dumps({"type": "text.input", "text": "My name is Ada."}))
    await collect_until(old, "response.done")
    cid, token = started["conversation_id"], started["resume_token"]
    if old_socket == "closed":
        await old.close()
        await wait_clean(stack, cid)
    url = f"{stack.ws_url}?conversation_id={cid}&resume_token={token}"

    async def attempt():
        ws = await websockets.connect(url, max_size=None)
        return ws, json.loads(await asyncio.wait_for(ws.recv(), 10))

    (ws_a, first_a), (ws_b, first_b) = await asyncio.gather(attempt(), attempt())
    outcomes = sorted([(first_a["type"], ws_a), (first_b["type"], ws_b)], key=lambda pair: pair[0])
    (loser_type, loser), (winner_type, winner) = outcomes
    assert (loser_type, winner_type) == ("error", "session.started")
    assert await wait_closed(loser) == 4404
    if old_socket == "open":
        assert await wait_closed(old) == 1000
    await winner.send(json.dumps({"type": "text.input", "text": "What is my name?"}))
    events, audio = await collect_until(winner, "response.done")
    assert events[-1]["text"] == "You said What is my name?. I remember 1 earlier questions." and audio
    state = await admin_get(stack, f"/admin/conversations/{cid}")
    assert state["connected"] is True  # the loser's end took nothing from the winner
    await winner.close()
    await wait_clean(stack, cid)


async def test_bad_resume_parameters_get_4404_never_a_500(stack):
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    for query in (
        f"conversation_id={cid}&resume_token={quote('jeton-é☃')}",
        f"conversation_id={cid}&resume_token=%FF%FE",
        f"conversation_id={'c' * 5000}&resume_token=x",
        f"conversation_id={quote('../*?[')}&resume_token=x",
        "resume_token=only",
    ):
        bad = await websockets.connect(f"{stack.ws_url}?{query}")
        assert (json.loads(await bad.recv()))["code"] == "unknown_conversation", query
        assert await wait_closed(bad) == 4404, query
    await ws.send(json.dumps({"type": "ping"}))  # the real owner was never disturbed
    assert (await next_event(ws))["type"] == "pong"
    await ws.close()
