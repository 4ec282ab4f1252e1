"""Turn-taking benchmarks: barge-in, `response.cancel` and the output guard, measured at the client.

    python -m bench.turn_taking [--trials 50] [--cancels 100] [--blocks 50]

- Barge-in: a reply is generating (even trials) or playing (odd trials); a spoken question starts
  over it, at real-time pace after 300 ms of digital silence. Measured: the onset of the speech in
  the client's audio (the first 10 ms whose level passes 1 % of the file's peak, -40 dB) -> the client
  receives `response.interrupted`; and the old turn's audio frames after it (must be 0).
- `response.cancel` -> `response.interrupted` at the client, while a reply plays.
- Guard: the reply streams a blocked term split over tokens and then stalls; measured on the fake
  LLM server's clock, the token that decided the block -> the server sees its client leave; and
  the whole blocked turn at the client, `text.input` -> `response.done`.

Starts its own `voicepipe up` (embedded Redis, real VAD, whisper and piper) with a fake
OpenAI-compatible LLM server in this process."""
from __future__ import annotations

import argparse
import asyncio
import os
import time
from array import array
from pathlib import Path

from bench.stack import percentile, running_stack
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.client import FRAME_BYTES, VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
LEAD_SILENCE = bytes(16000 * 2 * 3 // 10)  # 300 ms before the speech, so its onset is clean
LONG_REPLY = " ".join(
    [
        "Paris is the capital of France, and it sits on the river Seine.",
        "It has been the heart of French life for more than a thousand years.",
        "Millions of people visit it every year to see its museums and its old streets.",
        "The Eiffel Tower was built for a world fair and was meant to stand for twenty years.",
    ]
)
BLOCKED_TERM = "forbidden plan"
BLOCKED_TOKENS = ["Sure", ", here", " is", " the", " forb", "idden", " pl", "an", " in", " detail", "."]
DECIDING_TOKEN = 9  # tokens sent when the guard can decide: " in" shows the term has ended


def onset_offset(pcm: bytes) -> int:
    """Byte offset of the first 10 ms whose RMS passes 1 % of the loudest 10 ms (-40 dB): the very
    start of the sound, earlier than any VAD decides it is speech."""
    samples = array("h", pcm)
    windows = [samples[i : i + 160] for i in range(0, len(samples) - 160, 160)]
    levels = [(sum(x * x for x in w) / len(w)) ** 0.5 for w in windows]
    peak = max(levels)
    return next(i for i, level in enumerate(levels) if level > peak / 100) * 320


async def send_speech_timed(client: VoiceClient, pcm: bytes, onset: int) -> float:
    """Stream `pcm` then 1 s of silence as a microphone would (each 20 ms frame once its 20 ms have
    passed); returns the moment the onset sample was spoken, on the same clock."""
    pcm = pcm + bytes(-len(pcm) % FRAME_BYTES) + bytes(32000)
    start = time.monotonic()
    for offset in range(0, len(pcm), FRAME_BYTES):
        ahead = start + (offset + FRAME_BYTES) / 32000 - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        await client.ws.send(pcm[offset : offset + FRAME_BYTES])
    return start + onset / 32000


async def barge_in(ws_url: str, llm: FakeLlm, trials: int) -> dict[str, list[float]]:
    questions = [LEAD_SILENCE + read_audio_16k_mono(AUDIO / f"q{i}.wav") for i in range(1, 9)]
    onsets = [onset_offset(q) for q in questions]
    results: dict[str, list[float]] = {"generating": [], "playing": [], "old_frames_after": []}
    for trial in range(trials):
        mode = "generating" if trial % 2 == 0 else "playing"
        llm.reply, llm.token_delay_s = LONG_REPLY, (0.12 if mode == "generating" else 0.001)
        async with VoiceClient(ws_url) as client:
            reader = client.record()
            try:
                await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
                _, _, first = await reader.wait(lambda e: e["type"] == "response.audio.started")
                old = first["turn_id"]
                if mode == "playing":
                    await reader.wait(lambda e: e["type"] == "response.done")
                q = trial % len(questions)
                speaking = asyncio.create_task(send_speech_timed(client, questions[q], onsets[q]))
                index, at, _ = await reader.wait(lambda e: e["type"] == "response.interrupted" and e["turn_id"] == old)
                onset_at = await speaking
                results[mode].append((at - onset_at) * 1000)
                llm.token_delay_s = 0.001
                end, _, _ = await reader.wait(lambda e: e["type"] == "response.audio.started" and e["turn_id"] != old)
                results["old_frames_after"].append(reader.audio_frames(index, end))
            finally:
                await reader.aclose()
    return results


async def cancels(ws_url: str, llm: FakeLlm, n: int) -> list[float]:
    llm.reply, llm.token_delay_s = LONG_REPLY, 0.001
    latencies: list[float] = []
    async with VoiceClient(ws_url) as client:
        reader = client.record()
        try:
            for _ in range(n):
                await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
                mark = len(reader.frames)
                _, _, started = await reader.wait(lambda e: e["type"] == "response.audio.started", start=mark)
                sent = time.monotonic()
                await client.send_json({"type": "response.cancel"})
                _, at, _ = await reader.wait(
                    lambda e: e["type"] == "response.interrupted" and e["turn_id"] == started["turn_id"], start=mark
                )
                latencies.append((at - sent) * 1000)
        finally:
            await reader.aclose()
    return latencies


async def blocks(ws_url: str, llm: FakeLlm, n: int) -> tuple[list[float], list[float]]:
    llm.tokens, llm.stall_after, llm.token_delay_s = BLOCKED_TOKENS, DECIDING_TOKEN, 0.005
    to_close: list[float] = []
    turn: list[float] = []
    async with VoiceClient(ws_url) as client:
        reader = client.record()
        try:
            for _ in range(n):
                mark, sent = len(reader.frames), time.monotonic()
                await client.send_json({"type": "text.input", "text": "What is the plan?"})
                await reader.wait(lambda e: e["type"] == "response.blocked", start=mark)
                _, done_at, _ = await reader.wait(lambda e: e["type"] == "response.done", start=mark)
                turn.append((done_at - sent) * 1000)
                record = llm.streams[-1]
                ended = await record.wait_ended(timeout=10)
                assert record.tokens_sent == DECIDING_TOKEN and not record.completed
                to_close.append((ended - record.last_token_at) * 1000)
        finally:
            await reader.aclose()
            llm.tokens, llm.stall_after = None, None
    return to_close, turn


def show(title: str, values: list[float], target: str = "") -> None:
    line = f"  {title:44} n={len(values):3}  p50 {percentile(values, 50):6.1f} ms   p99 {percentile(values, 99):6.1f} ms   max {max(values):6.1f} ms"
    print(line + (f"   ({target})" if target else ""))


async def run(args: argparse.Namespace, http_url: str, llm: FakeLlm) -> None:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    result = await barge_in(ws_url, llm, args.trials)
    print(f"\nbarge-in, {args.trials} trials, BARGE_IN_MIN_SPEECH_MS={args.min_speech_ms}")
    both = result["generating"] + result["playing"]
    show("speech onset -> response.interrupted", both, f"target p99 <= {args.min_speech_ms + 100}")
    show("  ... while the reply generates", result["generating"])
    show("  ... while the reply plays", result["playing"])
    old = result["old_frames_after"]
    print(f"  old-turn audio frames after response.interrupted: {sum(old)} in total, max {max(old)} in a trial (target 0)")
    latencies = await cancels(ws_url, llm, args.cancels)
    print("\nresponse.cancel")
    show("response.cancel -> response.interrupted", latencies, "target p99 <= 30")
    to_close, turn = await blocks(ws_url, llm, args.blocks)
    print("\noutput guard")
    show("block decided -> upstream connection closed", to_close, "target p99 <= 50")
    show("blocked streaming turn, text.input -> done", turn, "target < 1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--cancels", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--min-speech-ms", type=int, default=200)
    args = parser.parse_args()
    with FakeLlmServer(FakeLlm()) as llm:
        env = {
            "VOICEPIPE_LLM_BASE_URL": llm.base_url,
            "VOICEPIPE_LOG_LEVEL": "WARNING",
            "VOICEPIPE_GUARD_BLOCKED_TERMS": BLOCKED_TERM,
            "VOICEPIPE_BARGE_IN_MIN_SPEECH_MS": str(args.min_speech_ms),
        }
        os.environ.pop("VOICEPIPE_REDIS_URL", None)
        with running_stack(None, env) as http_url:
            asyncio.run(run(args, http_url, llm))


if __name__ == "__main__":
    main()
