"""Fair model sharing: one client's transcription while three others send commits in a loop.

    python -m bench.fairness [--rounds 2] [--loaders 3]

Starts its own `voicepipe up` (embedded Redis, the real VAD and whisper, piper) with a fake
OpenAI-compatible LLM server inside this process that answers every turn with one short word, so
the load is the speech-to-text model's. A victim client speaks the eight benchmark questions at
real-time pace, one connection per turn, and reads `response.done.metrics`: first with nothing
else running (idle), then while `--loaders` other sockets each stream a spoken question at twice
real time (the rate limit allows four) followed by `input_audio.commit`, over and over, without
waiting for anything (every commit is a whisper job; a new one supersedes that socket's pending
one, shared/fair.py). Printed, idle and loaded, p50 and p90:
- `stt_ms`: whisper's compute time for the victim's utterance (issue 8's figure: loaded within
  2x idle);
- `speech_end_to_transcript_ms`: end of speech to transcript at the gateway, which also counts the
  wait for the model behind the other conversations' jobs (round-robin: at most the job under way
  and one of each other waiting conversation);
and how many whisper jobs the loaders got through, so the load is seen to be real."""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path


from bench.stack import percentile, running_stack
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.client import FRAME_BYTES, VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
QUESTIONS = [line.split("\t")[0] for line in (AUDIO / "questions.tsv").read_text().splitlines() if line]
METRICS = ["stt_ms", "speech_end_to_transcript_ms"]
LOADER_PACE = 2.0  # loaders stream at this multiple of real time (AUDIO_REALTIME_FACTOR allows 4)


async def one_turn(ws_url: str, pcm: bytes) -> dict[str, float] | None:
    async with VoiceClient(ws_url) as client:
        sender = asyncio.create_task(client.send_speech(pcm, realtime=True, trailing_silence_s=1.5))
        turn = await client.receive_turn(timeout=120)
        await sender
    if turn.done is None or "stt_ms" not in turn.done["metrics"]:
        return None
    return turn.done["metrics"]


async def victim(ws_url: str, rounds: int, label: str) -> list[dict[str, float]]:
    rows = []
    for round_ in range(rounds):
        for name in QUESTIONS:
            row = await one_turn(ws_url, read_audio_16k_mono(AUDIO / name))
            if row is None:
                print(f"  {label} {name}: no transcript", flush=True)
                continue
            rows.append(row)
            print(f"  {label} round {round_ + 1} {name}: stt_ms {row['stt_ms']:6.1f}   "
                  f"speech_end_to_transcript_ms {row['speech_end_to_transcript_ms']:6.1f}", flush=True)
    return rows


class Loader:
    """One socket that streams a question and commits, over and over, reading everything back."""

    def __init__(self, ws_url: str, pcm: bytes) -> None:
        self.ws_url = ws_url
        self.pcm = pcm + bytes(-len(pcm) % FRAME_BYTES)
        self.commits = 0
        self.transcripts = 0
        self.errors: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        async with VoiceClient(self.ws_url, compression=None) as client:
            reader = asyncio.create_task(self._read(client))
            try:
                loop = asyncio.get_running_loop()
                while not stop.is_set():
                    start = loop.time()
                    for i, offset in enumerate(range(0, len(self.pcm), FRAME_BYTES)):
                        await client.ws.send(self.pcm[offset : offset + FRAME_BYTES])
                        ahead = start + (i + 1) * 0.02 / LOADER_PACE - loop.time()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    await client.commit()
                    self.commits += 1
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, client: VoiceClient) -> None:
        async for event in client.frames():
            if isinstance(event, bytes):
                continue
            if event["type"] == "transcript.final" and event.get("text"):
                self.transcripts += 1
            elif event["type"] == "error":
                self.errors[event["code"]] = self.errors.get(event["code"], 0) + 1


def summary(rows: list[dict[str, float]], metric: str) -> tuple[float, float]:
    values = [row[metric] for row in rows if metric in row]
    return percentile(values, 50), percentile(values, 90)


async def run(http_url: str, rounds: int, loaders: int) -> None:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    await one_turn(ws_url, read_audio_16k_mono(AUDIO / QUESTIONS[0]))  # warm every stage once
    idle = await victim(ws_url, rounds, "idle")
    stop = asyncio.Event()
    load = [Loader(ws_url, read_audio_16k_mono(AUDIO / QUESTIONS[(i + 1) % len(QUESTIONS)])) for i in range(loaders)]
    tasks = [asyncio.create_task(loader.run(stop)) for loader in load]
    await asyncio.sleep(3)  # every loader has commits queued
    loaded = await victim(ws_url, rounds, "loaded")
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    print(f"\nvictim's turns: {len(idle)} idle, {len(loaded)} while {loaders} sockets sent commits in a loop "
          f"({sum(l.commits for l in load)} commits, {sum(l.transcripts for l in load)} transcripts, "
          f"errors {merge(l.errors for l in load) or 'none'})")
    print(f"{'metric (ms)':30} {'idle p50':>9} {'idle p90':>9} {'loaded p50':>11} {'loaded p90':>11} {'ratio p50':>10} {'ratio p90':>10}")
    for metric in METRICS:
        (i50, i90), (l50, l90) = summary(idle, metric), summary(loaded, metric)
        print(f"{metric:30} {i50:9.1f} {i90:9.1f} {l50:11.1f} {l90:11.1f} {l50 / i50:10.2f} {l90 / i90:10.2f}")


def merge(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            total[key] = total.get(key, 0) + n
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the eight questions, idle and loaded each")
    parser.add_argument("--loaders", type=int, default=3, help="sockets sending commits in a loop")
    args = parser.parse_args()
    with FakeLlmServer(FakeLlm(reply="Okay.")) as llm:
        env = {"VOICEPIPE_LLM_BASE_URL": llm.base_url, "VOICEPIPE_LOG_LEVEL": "WARNING"}
        os.environ.pop("VOICEPIPE_REDIS_URL", None)
        with running_stack(None, env) as http_url:
            asyncio.run(run(http_url, args.rounds, args.loaders))


if __name__ == "__main__":
    main()
