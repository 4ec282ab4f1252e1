"""Voice-to-voice through `/v1/realtime` against the same turns through `/v1/ws`, in one run.

Every spoken question is asked once over each protocol per round, on one stack: a pass over all
the questions on one protocol, then a pass on the other (which goes first alternates by round;
asking the same question twice in a row would let the second find its prompt in the LLM server's
cache). Over `/v1/ws` with the project's own
client (PCM 16 kHz frames), over `/v1/realtime` with the stock `openai` SDK (base64 PCM 24 kHz,
resampled by the gateway both ways). Latency is the same as in bench/voice_latency.py: the first
reply audio at the client minus the end of the speech in the input file. Target (issue): the
Realtime median within 20 ms of the `/v1/ws` median.

The LLM samples at temperature 0 on the stack this starts (`LLM_TEMPERATURE=0`), so the same words
get the same reply; the paired difference (Realtime minus `/v1/ws`, per question and round, where
both were heard as the same words) shows what the protocol costs without the spread of reply
lengths. Turns heard differently (whisper is sensitive to a few milliseconds of shift at the
utterance's edges) count in the per-protocol figures only.

Since the reply's first piece takes the models a different time on every run (±100 ms on two
shared cores), the figure that isolates the protocol is the edge: the client's voice-to-voice
minus the gateway's own `speech_end_to_first_audio_ms` of the same turn (on `/v1/ws` in
`response.done.metrics`, on `/v1/realtime` in `response.voicepipe.metrics`). It holds the way in
(client to gateway to the VAD's frames: where the end of speech is stamped) and the way out (the
gateway's first audio to the client), and none of the models' time. The clients run at a lower
CPU priority than the stack they start (`nice 10`), as if on machines of their own.

    python -m bench.realtime_latency [--url http://127.0.0.1:8000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import time
from pathlib import Path

import openai

from bench.stack import percentile, running_stack
from shared.resample import resample
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
RATE = 24000
CHUNK = RATE * 2 // 50  # 20 ms
TRAILING_SILENCE_S = 1.5


Turn = tuple[float, str, float]  # voice-to-voice ms, the transcript heard, the gateway's speech_end_to_first_audio_ms


async def ws_turn(http_url: str, pcm16: bytes) -> Turn | None:
    async with VoiceClient(http_url.replace("http", "ws", 1) + "/v1/ws") as client:
        sender = asyncio.create_task(client.send_speech(pcm16, realtime=True, trailing_silence_s=TRAILING_SILENCE_S))
        turn = await client.receive_turn(timeout=60)
        speech_end = await sender
    if turn.done is None or turn.first_audio_at is None:
        return None
    return (turn.first_audio_at - speech_end) * 1000, turn.transcript, turn.done["metrics"]["speech_end_to_first_audio_ms"]


async def _stream(conn, pcm: bytes) -> float:
    """Append 20 ms chunks at real-time pace, then silence; returns when the speech itself ended."""
    speech_end, silence = time.monotonic(), bytes(int(TRAILING_SILENCE_S * RATE) * 2)
    pcm += bytes(-len(pcm) % CHUNK)
    audio = pcm + silence
    start = time.monotonic()
    for offset in range(0, len(audio), CHUNK):
        if offset == len(pcm):
            speech_end = time.monotonic()
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio[offset : offset + CHUNK]).decode())
        ahead = start + (offset + CHUNK) / (RATE * 2) - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
    return speech_end


async def realtime_turn(http_url: str, pcm16: bytes) -> Turn | None:
    pcm = resample(pcm16, 16000, RATE)
    first_audio, transcript, status, server_ms = None, "", None, 0.0
    async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="bench", max_retries=0) as client:
        async with client.realtime.connect(model="voicepipe") as conn:
            await conn.recv()  # session.created
            sender = asyncio.create_task(_stream(conn, pcm))
            async with asyncio.timeout(60):
                async for event in conn:
                    if event.type == "response.output_audio.delta" and first_audio is None:
                        first_audio = time.monotonic()
                    elif event.type == "conversation.item.input_audio_transcription.completed":
                        transcript = event.transcript
                    elif event.type == "response.done":
                        status = event.response.status
                        timings = (event.response.model_extra or {}).get("voicepipe", {})
                        server_ms = timings.get("metrics", {}).get("speech_end_to_first_audio_ms", 0.0)
                        break
            speech_end = await sender
    if first_audio is None or status != "completed":
        return None
    return (first_audio - speech_end) * 1000, transcript, server_ms


async def run(http_url: str, rounds: int) -> tuple[dict[str, list[float]], list[float], dict[str, list[float]]]:
    questions = [line.split("\t")[0] for line in (AUDIO / "questions.tsv").read_text().splitlines() if line]
    warm = read_audio_16k_mono(AUDIO / questions[0])
    await ws_turn(http_url, warm)  # warm every stage and both paths once
    await realtime_turn(http_url, warm)
    results: dict[str, list[float]] = {"ws": [], "realtime": []}
    edges: dict[str, list[float]] = {"ws": [], "realtime": []}  # client voice-to-voice minus the gateway's own
    turns = {"ws": ws_turn, "realtime": realtime_turn}
    by_question: dict[tuple[str, int], dict[str, Turn]] = {}
    for round_ in range(rounds):
        for protocol in ("ws", "realtime") if round_ % 2 == 0 else ("realtime", "ws"):
            for name in questions:
                turn = await turns[protocol](http_url, read_audio_16k_mono(AUDIO / name))
                if turn is None:
                    print(f"  round {round_ + 1} {protocol} {name}: no reply", flush=True)
                    continue
                results[protocol].append(turn[0])
                edges[protocol].append(turn[0] - turn[2])
                by_question.setdefault((name, round_), {})[protocol] = turn
                print(f"  round {round_ + 1} {protocol} {name}: {turn[0]:.0f} ms  heard {turn[1]!r}", flush=True)
    # the same turn: the same words heard, so (at temperature 0) the same reply to wait for
    paired = [
        p["realtime"][0] - p["ws"][0] for p in by_question.values() if len(p) == 2 and same(p["realtime"][1], p["ws"][1])
    ]
    return results, paired, edges


def same(a: str, b: str) -> bool:
    def words(text: str) -> list[str]:
        return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()

    return words(a) == words(b)


def report(results: dict[str, list[float]], paired: list[float], edges: dict[str, list[float]]) -> None:
    print("\nclient voice-to-voice (ms): first reply audio minus the end of the speech")
    print(f"{'protocol':12} {'turns':>6} {'p50':>8} {'p90':>8}")
    for protocol, values in results.items():
        print(f"{'/v1/' + protocol:12} {len(values):6d} {percentile(values, 50):8.0f} {percentile(values, 90):8.0f}")
    if results["ws"] and results["realtime"]:
        gap = percentile(results["realtime"], 50) - percentile(results["ws"], 50)
        print(f"\n/v1/realtime p50 minus /v1/ws p50: {gap:+.0f} ms (target: within 20 ms)")
    if paired:
        print(
            f"paired, Realtime minus /v1/ws on the same question heard as the same words: "
            f"p50 {percentile(paired, 50):+.0f} ms over {len(paired)} pairs"
        )
    if edges["ws"] and edges["realtime"]:
        print("\nthe edge: client voice-to-voice minus the gateway's own speech_end_to_first_audio_ms")
        print("(the way in to the VAD's frames and the way out to the client; the models' spread cancels)")
        for protocol, values in edges.items():
            print(f"{'/v1/' + protocol:12} {len(values):6d} {percentile(values, 50):8.0f} {percentile(values, 90):8.0f}")
        gap = percentile(edges["realtime"], 50) - percentile(edges["ws"], 50)
        print(f"/v1/realtime edge minus /v1/ws edge at p50: {gap:+.0f} ms (target: within 20 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running stack (default: start `voicepipe up` with embedded defaults)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_stack(args.url, env={"VOICEPIPE_LLM_TEMPERATURE": "0"}) as http_url:
        # the clients stand in for other machines: on two shared cores they yield to the stack, so
        # the SDK's own CPU (it validates every event) does not slow the models of its own turns
        os.nice(10)
        results, paired, edges = asyncio.run(run(http_url, args.rounds))
    report(results, paired, edges)


if __name__ == "__main__":
    main()
