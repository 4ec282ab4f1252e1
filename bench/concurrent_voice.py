"""Concurrent spoken conversations on the embedded defaults: failed turns and voice-to-voice latency
with 1, 2, 4 and 6 clients speaking at once.

    python -m bench.concurrent_voice [--url http://127.0.0.1:8000] [--clients 1,2,4,6] [--turns 6]

Starts `voicepipe up` with embedded Redis and the embedded SmolLM2 server (the real models, one
process per stage) unless `--url` names a running stack. For each N, N clients each open one
conversation and speak `--turns` recorded questions in it (bench/audio, each client starting at a
different one), at real-time pace with 1.5 s of silence after each; a client speaks its next
question half a second after the reply to the last has played (as a listener would: speaking over
it would interrupt it), and all N start together, so their questions and replies overlap all the
time. A turn fails when it brings an `error`, no `response.done` within 120 s, an empty reply or no
reply audio; a client whose turn timed out stops there. Latency is measured as in bench/voice_latency.py: first
reply audio byte at the client minus the end of the speech sent (client), and the server's
`speech_end_to_first_audio_ms`; p50 and p95 over the turns that did not fail. Under each step the
`--slowest` turns are broken down by their `response.done` metrics and diagnostics: where their
time went (the end-of-speech wait, transcription, the LLM's first token, the first piece's
speech) and whether the reply was speculative."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

from bench.stack import percentile, running_stack
from voicepipe.client import TurnResult, VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
TURN_TIMEOUT_S = 120.0  # generous: on a machine shared with other work a queued reply can take long
QUESTIONS = [line.split("\t")[0] for line in (AUDIO / "questions.tsv").read_text().splitlines() if line]


class Step:
    def __init__(self) -> None:
        self.client_ms: list[float] = []
        self.done: list[tuple[float, int, dict]] = []  # (client ms, client, response.done) of each turn
        self.server_ms: list[float] = []
        self.failed: Counter[str] = Counter()
        self.turns = 0


async def receive_turn(client: VoiceClient, timeout: float) -> tuple[TurnResult, float]:
    """The turn's events and audio up to `response.done`, and when its audio ends playing at a
    client that plays every frame as it comes (a frame that finds the player idle starts at once)."""
    result = TurnResult()
    played_at = 0.0
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.ws.recv()
            now = time.monotonic()
            if isinstance(frame, bytes):
                result.first_audio_at = result.first_audio_at or now
                result.audio += frame
                played_at = max(played_at, now) + len(frame) / (2 * client.output_rate)
                continue
            event = json.loads(frame)
            result.events.append(event)
            if event["type"] == "response.done":
                result.done = event
                return result, played_at
            if event["type"] == "transcript.final" and not event.get("text"):
                return result, played_at


async def conversation(ws_url: str, first: int, turns: int, step: Step) -> None:
    async with VoiceClient(ws_url) as client:
        for i in range(turns):
            pcm = read_audio_16k_mono(AUDIO / QUESTIONS[(first + i) % len(QUESTIONS)])
            step.turns += 1
            sender = asyncio.create_task(client.send_speech(pcm, realtime=True, trailing_silence_s=1.5))
            try:
                turn, played_at = await receive_turn(client, timeout=TURN_TIMEOUT_S)
            except TimeoutError:
                step.failed[f"no response.done within {TURN_TIMEOUT_S:.0f} s"] += 1
                sender.cancel()
                return  # the socket may still carry the late reply: this conversation ends here
            speech_end = await sender
            if turn.errors:
                step.failed.update(f"error {e.get('code')}" for e in turn.errors)
            elif turn.done is None or not turn.done.get("text"):
                step.failed["empty reply"] += 1
            elif turn.first_audio_at is None:
                step.failed["no reply audio"] += 1
            else:
                step.client_ms.append((turn.first_audio_at - speech_end) * 1000)
                step.done.append((step.client_ms[-1], first, turn.done))
                if "speech_end_to_first_audio_ms" in turn.done["metrics"]:
                    step.server_ms.append(turn.done["metrics"]["speech_end_to_first_audio_ms"])
            # a listener speaks again once the reply has played (speaking over it is a barge-in)
            await asyncio.sleep(max(0.0, played_at - time.monotonic()) + 0.5)


async def run_step(ws_url: str, clients: int, turns: int) -> Step:
    step = Step()
    results = await asyncio.gather(
        *(conversation(ws_url, i, turns, step) for i in range(clients)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            step.failed[f"client {type(result).__name__}"] += 1
    return step


BREAKDOWN = [  # (column, source, key) of a slow turn's breakdown
    ("endpoint", "diagnostics", "endpointing_ms"),
    ("to text", "metrics", "speech_end_to_transcript_ms"),
    ("stt", "metrics", "stt_ms"),
    ("to token", "metrics", "transcript_to_first_token_ms"),
    ("to audio", "metrics", "first_token_to_first_audio_ms"),
    ("held", "diagnostics", "audio_held_ms"),
    ("overhead", "diagnostics", "pipeline_overhead_ms"),
]


def print_slowest(step: Step, count: int) -> None:
    """Where the slowest turns' time went, from their `response.done` (ms; '-' where absent)."""
    if count <= 0 or not step.done:
        return
    print("    slowest: " + " ".join(f"{c:>9}" for c in ["client", "conv", *(name for name, _, _ in BREAKDOWN), "spec"]))
    for client_ms, who, done in sorted(step.done, key=lambda t: t[0], reverse=True)[:count]:
        cells = [f"{client_ms:9.0f}", f"{who:9d}"]
        for _, source, key in BREAKDOWN:
            value = done.get(source, {}).get(key)
            cells.append(f"{value:9.0f}" if value is not None else f"{'-':>9}")
        cells.append(f"{'yes' if done.get('diagnostics', {}).get('speculative') else 'no':>9}")
        print("             " + " ".join(cells))


async def run(http_url: str, counts: list[int], turns: int, slowest: int) -> None:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    await run_step(ws_url, 1, 1)  # warm every stage once
    print(f"{'clients':>7} {'turns':>6} {'failed':>6} {'client p50':>11} {'p95':>6} {'server p50':>11} {'p95':>6}  failures")
    for n in counts:
        step = await run_step(ws_url, n, turns)
        failed = sum(step.failed.values())
        print(
            f"{n:7} {step.turns:6} {failed:6} {percentile(step.client_ms, 50):11.0f} {percentile(step.client_ms, 95):6.0f}"
            f" {percentile(step.server_ms, 50):11.0f} {percentile(step.server_ms, 95):6.0f}  {dict(step.failed) or '-'}",
            flush=True,
        )
        print_slowest(step, slowest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running stack (default: start `voicepipe up` with embedded defaults)")
    parser.add_argument("--clients", default="1,2,4,6")
    parser.add_argument("--turns", type=int, default=6, help="spoken turns per client at each step")
    parser.add_argument("--slowest", type=int, default=3, help="turns broken down under each step")
    args = parser.parse_args()
    with running_stack(args.url) as http_url:
        asyncio.run(run(http_url, [int(n) for n in args.clients.split(",")], args.turns, args.slowest))


if __name__ == "__main__":
    main()
