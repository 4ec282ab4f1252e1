"""`voicepipe talk FILE.wav`: speak a file to the assistant; print what it heard and said, save the reply."""
from __future__ import annotations

import asyncio
import json
import sys

from voicepipe.client import VoiceClient
from voicepipe.wavio import WavError, read_wav_16k_mono, write_wav


async def _talk(path: str, url: str, out: str, timeout: float) -> int:
    try:
        pcm = read_wav_16k_mono(path)
    except WavError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        async with VoiceClient(url) as client:
            sender = asyncio.create_task(client.send_speech(pcm), name="talk:send")
            try:
                turn = await client.receive_turn(timeout)
            finally:
                sender.cancel()
            rate = client.output_rate
    except (OSError, TimeoutError) as exc:
        print(f"error: no answer from {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    for error in turn.errors:
        print(f"error from server: {error.get('code')}: {error.get('message')}", file=sys.stderr)
    print(f"you said:  {turn.transcript or '(nothing heard)'}")
    if turn.done is None:
        return 1
    print(f"assistant: {turn.done['text']}")
    print(f"metrics:   {json.dumps(turn.done.get('metrics', {}))}")
    if turn.audio:
        write_wav(out, bytes(turn.audio), rate)
        print(f"reply audio: {out} ({len(turn.audio) / 2 / rate:.1f} s at {rate} Hz)")
    return 0


def talk(path: str, url: str, out: str, timeout: float = 60.0) -> int:
    return asyncio.run(_talk(path, url, out, timeout))
