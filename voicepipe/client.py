"""The one client of the voicepipe protocol (`/v1/ws`, docs/protocol.md §1): `voicepipe talk`, the
disconnect simulator, the benchmarks and the tests all speak it through this module.

`VoiceClient` is the whole client (connect with a token in any of its three places, resume,
stream speech at microphone pace, read a turn, end the socket in any of the ways a real client
does). The reading helpers (`next_event`, `collect_until`, `wait_closed`) also work on a bare
`websockets` connection, for tests that drive the socket frame by frame."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets

FRAME_BYTES = 640  # 20 ms at 16 kHz
SUBPROTOCOL = "voicepipe.v1"
TokenPlace = Literal["header", "subprotocol", "query"]
DropWay = Literal["close", "drop", "silent"]


class SessionRefused(RuntimeError):
    """The server's first event was not `session.started` (an `error` such as `not_ready` before a
    close, or a 4404 resume refusal); `event` is what it sent instead."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__(f"expected session.started, got {event.get('type')} {event.get('code', '')}".strip())
        self.event = event


async def next_event(ws, timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON event, skipping binary audio."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str):
                return json.loads(frame)


async def collect_until(ws, type_: str, timeout: float = 30.0) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Every event and audio frame up to and including the first event of `type_`."""
    events: list[dict[str, Any]] = []
    audio: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                audio.append(frame)
                continue
            events.append(json.loads(frame))
            if events[-1]["type"] == type_:
                return events, audio


async def wait_closed(ws, timeout: float = 10.0) -> int:
    """Drain until the server closes; returns the close code (1006: no close frame)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else 1006


@dataclass
class TurnResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    first_audio_at: float | None = None  # time.monotonic() of the first reply audio byte
    done: dict[str, Any] | None = None

    def texts(self, type_: str) -> list[str]:
        return [e.get("text", "") for e in self.events if e["type"] == type_]

    @property
    def transcript(self) -> str:
        return " ".join(t for t in self.texts("transcript.final") if t)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "error"]


def with_query(url: str, **params: str) -> str:
    """`url` with these query parameters set (others kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode(query + list(params.items()))))


class VoiceClient:
    """A client of `/v1/ws`. A client token (docs/protocol.md §1) goes as `Authorization: Bearer`
    by default, where it stays out of URLs and server logs; `token_in="subprotocol"` sends it as
    browsers do (`voicepipe.v1` + `token.<T>`), `"query"` as the `token` query parameter."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        token_in: TokenPlace = "header",
        *,
        resume: tuple[str, str] | None = None,
        subprotocols: list[str] | None = None,
        **connect_options: Any,
    ) -> None:
        """`resume`: (conversation_id, resume_token) of a conversation to take up again.
        `connect_options` go to `websockets.connect` as they are (`origin`, `open_timeout`...)."""
        self.url = url if resume is None else with_query(url, conversation_id=resume[0], resume_token=resume[1])
        self.headers = dict(headers or {})
        self.subprotocols: list[str] | None = subprotocols
        self.connect_options = connect_options
        if token is not None:
            if token_in == "header":
                self.headers["Authorization"] = f"Bearer {token}"
            elif token_in == "subprotocol":
                self.subprotocols = [SUBPROTOCOL, f"token.{token}"]
            elif token_in == "query":
                self.url = with_query(self.url, token=token)
            else:
                raise ValueError(f"token_in must be header, subprotocol or query, not {token_in!r}")
        self.ws: websockets.ClientConnection | None = None
        self.session: dict[str, Any] = {}

    async def __aenter__(self) -> "VoiceClient":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def open(self, timeout: float = 10.0) -> "VoiceClient":
        """Connect and read `session.started` (SessionRefused if the server says anything else first)."""
        self.ws = await websockets.connect(
            self.url, additional_headers=self.headers, subprotocols=self.subprotocols, max_size=None,
            **self.connect_options,
        )
        try:
            self.session = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        except BaseException:
            self.ws.transport.abort()
            raise
        if self.session.get("type") != "session.started":
            self.ws.transport.abort()
            raise SessionRefused(self.session)
        return self

    @property
    def output_rate(self) -> int:
        return self.session["output_audio"]["sample_rate"]

    @property
    def conversation_id(self) -> str:
        return self.session["conversation_id"]

    @property
    def resume_token(self) -> str:
        return self.session["resume_token"]

    async def say(self, text: str) -> None:
        """A typed turn (`text.input`)."""
        await self.send_json({"type": "text.input", "text": text})

    async def commit(self) -> None:
        """End the utterance under way now (`input_audio.commit`)."""
        await self.send_json({"type": "input_audio.commit"})

    async def frames(self) -> AsyncIterator[dict[str, Any] | bytes]:
        """Everything the server sends, as it comes: events as dicts, reply audio as bytes; ends
        when the socket closes."""
        async for frame in self.ws:
            yield frame if isinstance(frame, bytes) else json.loads(frame)

    async def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        return await next_event(self.ws, timeout)

    async def collect_until(self, type_: str, timeout: float = 30.0) -> tuple[list[dict[str, Any]], list[bytes]]:
        return await collect_until(self.ws, type_, timeout)

    async def wait_closed(self, timeout: float = 10.0) -> int:
        return await wait_closed(self.ws, timeout)

    def drop(self, way: DropWay) -> asyncio.Future[None] | None:
        """End this side of the socket the way a real client may: `close` (a close handshake, under
        way in the returned future), `drop` (the TCP connection vanishes, no close frame), `silent`
        (never reads again, so never answers a ping)."""
        if way == "close":
            return asyncio.ensure_future(self.ws.close())
        if way == "drop":
            self.ws.transport.abort()
            return None
        if way == "silent":
            self.ws.transport.pause_reading()
            return None
        raise ValueError(f"unknown way to end a socket: {way!r}")

    def abort(self) -> None:
        """Drop the TCP connection at once (no close frame); safe at any time."""
        if self.ws is not None:
            self.ws.transport.abort()

    async def send_speech(self, pcm: bytes, *, realtime: bool = True, trailing_silence_s: float = 1.0) -> float:
        """Stream speech in 20 ms frames (at real-time pace unless told otherwise), then silence.

        Returns the monotonic time the speech itself ended (before the trailing silence)."""
        start = time.monotonic()
        pcm = pcm + bytes(-len(pcm) % FRAME_BYTES)
        speech_end = start
        silence = bytes(int(trailing_silence_s * 16000) * 2)
        for offset in range(0, len(pcm) + len(silence), FRAME_BYTES):
            if offset == len(pcm):
                speech_end = time.monotonic()
            source = pcm if offset < len(pcm) else silence
            position = offset if offset < len(pcm) else offset - len(pcm)
            await self.ws.send(source[position : position + FRAME_BYTES])
            if realtime:
                ahead = start + (offset + FRAME_BYTES) / 32000 - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        return speech_end

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    def record(self) -> "Recording":
        """Read everything the server sends from now on in the background (instead of `receive_turn`)."""
        return Recording(self)

    async def receive_turn(self, timeout: float = 60.0) -> TurnResult:
        """Collect events until `response.done` (or a transcript that starts no response)."""
        result = TurnResult()
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.ws.recv()
                if isinstance(frame, bytes):
                    if result.first_audio_at is None:
                        result.first_audio_at = time.monotonic()
                    result.audio += frame
                    continue
                event = json.loads(frame)
                result.events.append(event)
                if event["type"] == "response.done":
                    result.done = event
                    return result
                if event["type"] == "transcript.final" and not event.get("text"):
                    return result


class Recording:
    """Everything the server sends on one client, in arrival order: `(time.monotonic(), frame)` with
    JSON events as dicts and audio as bytes. For clients that talk while the server talks (barge-in)."""

    def __init__(self, client: VoiceClient) -> None:
        self.frames: list[tuple[float, dict[str, Any] | bytes]] = []
        self._ws = client.ws
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self._ws:
            self.frames.append((time.monotonic(), json.loads(frame) if isinstance(frame, str) else frame))
            self._new.set()

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [f for _, f in self.frames if isinstance(f, dict) and type_ in (None, f["type"])]

    def audio_frames(self, start: int, end: int | None = None) -> int:
        """Audio frames received between frame indexes `start` and `end`."""
        return sum(isinstance(f, bytes) for _, f in self.frames[start:end])

    async def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, start: int = 0
    ) -> tuple[int, float, dict[str, Any]]:
        """The first event from index `start` on that matches: (its index, arrival time, event)."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(start, len(self.frames)):
                    at, frame = self.frames[i]
                    if isinstance(frame, dict) and predicate(frame):
                        return i, at, frame
                start = len(self.frames)
                self._new.clear()
                await self._new.wait()

    async def wait_event(self, type_: str, turn_id: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        _, _, event = await self.wait(lambda e: e["type"] == type_ and turn_id in (None, e.get("turn_id")), timeout)
        return event

    async def wait_audio(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while self.audio_frames(0) < count:
                self._new.clear()
                await self._new.wait()

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
