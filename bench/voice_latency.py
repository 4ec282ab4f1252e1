"""Voice-to-voice latency: spoken questions streamed at real-time pace over a WebSocket.

Latency = first reply audio byte at the client minus the end of the speech in the input file (the
same measurement as the Pipecat anchor in TARGETS.md), plus every server metric of PROTOCOL §1.1.

    python -m bench.voice_latency [--url http://127.0.0.1:8000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import csv
from pathlib import Path

from bench.stack import percentile, running_stack
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
METRICS = [
    "client_voice_to_voice_ms", "speech_end_to_first_audio_ms", "speech_end_to_transcript_ms",
    "transcript_to_first_token_ms", "first_token_to_first_audio_ms", "stt_ms", "llm_ms", "tts_ms",
    "endpointing_ms", "pipeline_overhead_ms",
]


async def one_turn(ws_url: str, pcm: bytes) -> dict[str, float] | None:
    async with VoiceClient(ws_url) as client:
        sender = asyncio.create_task(client.send_speech(pcm, realtime=True, trailing_silence_s=1.5))
        turn = await client.receive_turn(timeout=60)
        speech_end = await sender
    if turn.done is None or turn.first_audio_at is None:
        return None
    row = {**turn.done["metrics"], **turn.done.get("diagnostics", {})}
    row["client_voice_to_voice_ms"] = (turn.first_audio_at - speech_end) * 1000
    row["transcript"] = turn.transcript
    row["reply"] = turn.done["text"]
    return row


async def run(http_url: str, rounds: int) -> list[dict[str, float]]:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    questions = [line.split("\t") for line in (AUDIO / "questions.tsv").read_text().splitlines() if line]
    rows = []
    await one_turn(ws_url, read_audio_16k_mono(AUDIO / questions[0][0]))  # warm every stage once
    for round_ in range(rounds):
        for name, text in questions:
            row = await one_turn(ws_url, read_audio_16k_mono(AUDIO / name))
            if row is None:
                print(f"  {name}: no reply")
                continue
            rows.append(row)
            print(f"  round {round_ + 1} {name}: {row['client_voice_to_voice_ms']:.0f} ms  heard {row['transcript']!r}")
    return rows


def report(rows: list[dict[str, float]]) -> None:
    print(f"\nvoice-to-voice over {len(rows)} spoken turns (ms)")
    print(f"{'metric':34} {'p50':>8} {'p90':>8}")
    for metric in METRICS:
        values = [r[metric] for r in rows if metric in r]
        print(f"{metric:34} {percentile(values, 50):8.0f} {percentile(values, 90):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running stack (default: start `voicepipe up` with embedded defaults)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--csv", help="also write every turn's figures to this file")
    args = parser.parse_args()
    with running_stack(args.url) as http_url:
        rows = asyncio.run(run(http_url, args.rounds))
    report(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*METRICS, "transcript", "reply"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
