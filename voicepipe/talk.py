"""`voicepipe talk FILE`: speak an audio file (any format PyAV reads) to the assistant; print what it heard and said, save the reply."""
from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import urlsplit, urlunsplit

import websockets

from voicepipe.client import SessionRefused, VoiceClient
from voicepipe.wavio import WavError, read_audio_16k_mono, write_wav


def websocket_url(url: str) -> str:
    """The client WebSocket URL for what a person may type: `ws://host:port/v1/ws` as is, or the
    gateway's address (`http://host:port`, `host:port`), which gets the ws scheme and `/v1/ws`."""
    if "://" not in url:
        url = f"ws://{url}"
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"{url!r} is not a ws://, wss://, http:// or https:// address of the gateway")
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


async def _talk(path: str, url: str, out: str, timeout: float, token: str | None = None) -> int:
    try:
        pcm = read_audio_16k_mono(path)
        url = websocket_url(url)
    except (WavError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        async with VoiceClient(url, token=token) as client:
            sender = asyncio.create_task(client.send_speech(pcm), name="talk:send")
            try:
                turn = await client.receive_turn(timeout)
            finally:
                sender.cancel()
            rate = client.output_rate
    except SessionRefused as exc:
        refusal = exc.event
        print(f"error: {url} refused the conversation: {refusal.get('code', refusal.get('type'))}: {refusal.get('message', '')}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        print(f"error: no answer from {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    for error in turn.errors:
        print(f"error from server: {error.get('code')}: {error.get('message')}", file=sys.stderr)
    print(f"you said:  {turn.transcript or '(nothing heard)'}")
    if turn.done is None:
        return 1
    print(f"assistant: {turn.done['text']}")
    print(f"metrics:   {json.dumps(turn.done.get('metrics', {}))}")
    print(f"diagnostics: {json.dumps(turn.done.get('diagnostics', {}))}")
    if turn.audio:
        write_wav(out, bytes(turn.audio), rate)
        print(f"reply audio: {out} ({len(turn.audio) / 2 / rate:.1f} s at {rate} Hz)")
    return 0


def talk(path: str, url: str, out: str, timeout: float = 60.0, token: str | None = None) -> int:
    return asyncio.run(_talk(path, url, out, timeout, token))
