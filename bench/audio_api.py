"""The OpenAI Audio API's latency, measured with the stock `openai` SDK as a client would see it.

- transcription: a 3 s spoken clip (WAV and MP3 uploads), request sent -> text received;
- speech: a two-sentence text, request sent -> first audio byte, and -> last byte (`pcm`, `mp3`).

    python -m bench.audio_api [--url http://127.0.0.1:8000] [--rounds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import openai

from bench.stack import percentile, running_stack
from shared.audiofile import SpeechEncoder
from voicepipe.wavio import read_audio_16k_mono

AUDIO = Path(__file__).parent / "audio"
CLIP_S = 3.0
SPEECH_TEXT = "The capital of France is Paris. It is known for its museums and its food."


def clips() -> list[tuple[str, bytes, bytes]]:
    """(name, wav, mp3) of every question, cut or padded with silence to exactly CLIP_S."""
    out = []
    for path in sorted(AUDIO.glob("q*.wav")):
        pcm = read_audio_16k_mono(path)[: int(CLIP_S * 16000) * 2]
        pcm += bytes(int(CLIP_S * 16000) * 2 - len(pcm))
        wav = SpeechEncoder("wav", 16000)
        mp3 = SpeechEncoder("mp3", 16000)
        wav_bytes = wav.encode(pcm) + wav.finish()
        out.append((path.stem, wav_bytes, mp3.encode(pcm) + mp3.finish()))
    return out


async def run(http_url: str, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {k: [] for k in (
        "transcription_wav_ms", "transcription_mp3_ms", "speech_pcm_first_byte_ms", "speech_pcm_total_ms",
        "speech_mp3_first_byte_ms", "speech_mp3_total_ms",
    )}
    async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="bench", max_retries=0, timeout=120) as client:
        audio = clips()
        await client.audio.transcriptions.create(model="whisper-1", file=("warm.wav", audio[0][1]))  # warm
        for round_ in range(rounds):
            for name, wav, mp3 in audio:
                for kind, data in (("wav", wav), ("mp3", mp3)):
                    started = time.perf_counter()
                    result = await client.audio.transcriptions.create(model="whisper-1", file=(f"{name}.{kind}", data))
                    figures[f"transcription_{kind}_ms"].append((time.perf_counter() - started) * 1000)
                if round_ == 0:
                    print(f"  {name}: heard {result.text!r}")
            for kind in ("pcm", "mp3"):
                started = time.perf_counter()
                first = None
                async with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input=SPEECH_TEXT, response_format=kind
                ) as response:
                    async for chunk in response.iter_bytes():
                        if first is None and chunk:
                            first = time.perf_counter()
                ended = time.perf_counter()
                figures[f"speech_{kind}_first_byte_ms"].append((first - started) * 1000)
                figures[f"speech_{kind}_total_ms"].append((ended - started) * 1000)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running stack (default: start `voicepipe up` with embedded defaults)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_stack(args.url) as http_url:
        figures = asyncio.run(run(http_url, args.rounds))
    print(f"\nOpenAI Audio API, {CLIP_S:g} s clips and a {len(SPEECH_TEXT)}-character text (ms)")
    print(f"{'metric':28} {'n':>4} {'p50':>8} {'p90':>8}")
    for metric, values in figures.items():
        print(f"{metric:28} {len(values):4d} {percentile(values, 50):8.0f} {percentile(values, 90):8.0f}")


if __name__ == "__main__":
    main()
