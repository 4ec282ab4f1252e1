"""Voice-to-voice latency: spoken questions streamed at real-time pace over a WebSocket.

Latency = first reply audio byte at the client minus the end of the speech in the input file (the
same measurement as the Pipecat anchor in TARGETS.md), plus every server metric of PROTOCOL §1.1.
Speculative replies: how many replies were speculative, how long their audio was held, and the
speculations started / confirmed / wasted over the run, read from the workers' own `/metrics`
(the stack started here serves them from `METRICS_PORT`; with `--url`, pass that port as
`--metrics-port`, each worker of `voicepipe up` on the next one).

    python -m bench.voice_latency [--url http://127.0.0.1:8000] [--rounds 2] [--questions FILE.tsv]
    VOICEPIPE_SPECULATIVE_REPLY=false python -m bench.voice_latency   # the same without speculation

`--questions` names another set: a TSV of `file<TAB>text` beside its WAV files (16 kHz mono, ending
where the speech ends). bench/audio/pauses/questions.tsv holds questions spoken with pauses inside
them (commas, "um"), where an early transcript can come before the user has finished: the set that
shows what speculation wastes.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from voicepipe.embedded import free_port

from bench.stack import percentile, running_stack
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
METRICS = [
    "client_voice_to_voice_ms", "speech_end_to_first_audio_ms", "speech_end_to_transcript_ms",
    "transcript_to_first_token_ms", "first_token_to_first_audio_ms", "stt_ms", "llm_ms", "tts_ms",
    "endpointing_ms", "pipeline_overhead_ms", "audio_held_ms",
]
WORKERS = 3  # `voicepipe up` serves each worker's /metrics on METRICS_PORT + 0, 1, 2


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


async def speculations(metrics_port: int) -> dict[str, float]:
    """Speculative replies started / confirmed / wasted, their wasted model seconds and the early
    transcripts kept or stale, summed over the workers' /metrics pages."""
    total: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for port in range(metrics_port, metrics_port + WORKERS):
            try:
                page = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(page):
                for sample in family.samples:
                    if sample.name == "voicepipe_speculative_replies_started_total":
                        key = "started"
                    elif sample.name == "voicepipe_speculative_replies_total":
                        key = sample.labels["outcome"]
                    elif sample.name == "voicepipe_speculation_wasted_seconds_total":
                        key = f"wasted_s_{sample.labels['stage']}"
                    elif sample.name == "voicepipe_early_transcripts_total":
                        key = f"early_{sample.labels['outcome']}"
                    else:
                        continue
                    total[key] = total.get(key, 0) + sample.value
    return total


async def run(http_url: str, rounds: int, questions_tsv: Path = AUDIO / "questions.tsv") -> list[dict[str, float]]:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    folder = questions_tsv.parent
    questions = [line.split("\t") for line in questions_tsv.read_text().splitlines() if line]
    rows = []
    await one_turn(ws_url, read_audio_16k_mono(folder / questions[0][0]))  # warm every stage once
    for round_ in range(rounds):
        for name, text in questions:
            row = await one_turn(ws_url, read_audio_16k_mono(folder / name))
            if row is None:
                print(f"  {name}: no reply")
                continue
            rows.append(row)
            print(f"  round {round_ + 1} {name}: {row['client_voice_to_voice_ms']:.0f} ms  heard {row['transcript']!r}")
    return rows


def report(rows: list[dict[str, float]], spec: dict[str, float]) -> None:
    cut = [r for r in rows if r["client_voice_to_voice_ms"] < 0]
    if cut:  # the turn ended at a pause inside the question: a latency that only looks good
        print(f"\ncut off: {len(cut)} of {len(rows)} turns were answered before the speech ended (left out below)")
        rows = [r for r in rows if r["client_voice_to_voice_ms"] >= 0]
    print(f"\nvoice-to-voice over {len(rows)} spoken turns (ms)")
    print(f"{'metric':34} {'p50':>8} {'p90':>8}")
    for metric in METRICS:
        values = [r[metric] for r in rows if metric in r]
        if values:
            print(f"{metric:34} {percentile(values, 50):8.0f} {percentile(values, 90):8.0f}")
    speculative = sum(bool(r.get("speculative")) for r in rows)
    print(f"\nspeculative replies: {speculative} of {len(rows)} turns")
    if spec:
        started, wasted = int(spec.get("started", 0)), int(spec.get("wasted", 0))
        share = f" ({wasted / started:.0%} of those started)" if started else ""
        print(
            f"speculations over the run (warm-up included): started {started}, confirmed {int(spec.get('confirmed', 0))}, "
            f"wasted {wasted}{share}; model time wasted: LLM {spec.get('wasted_s_llm', 0):.2f} s, "
            f"TTS {spec.get('wasted_s_tts', 0):.2f} s"
        )
        final, stale = int(spec.get("early_final", 0)), int(spec.get("early_stale", 0))
        print(f"early transcripts of a pause: {final + stale}, {final} kept as the final transcript, {stale} stale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running stack (default: start `voicepipe up` with embedded defaults)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--csv", help="also write every turn's figures to this file")
    parser.add_argument("--questions", type=Path, default=AUDIO / "questions.tsv", help="the question set (a TSV beside its WAVs)")
    parser.add_argument("--metrics-port", type=int, help="with --url: the first worker's METRICS_PORT")
    args = parser.parse_args()
    metrics_port = args.metrics_port or int(os.environ.get("VOICEPIPE_METRICS_PORT") or 0) or free_port()
    with running_stack(args.url, {"VOICEPIPE_METRICS_PORT": str(metrics_port)}) as http_url:
        rows = asyncio.run(run(http_url, args.rounds, args.questions))
        spec = asyncio.run(speculations(metrics_port))
    report(rows, spec)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*METRICS, "speculative", "transcript", "reply"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
