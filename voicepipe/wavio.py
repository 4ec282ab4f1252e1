"""Reading any PCM WAV as 16 kHz mono s16le, and writing reply audio."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

TARGET_RATE = 16000


class WavError(ValueError):
    pass


def read_wav_16k_mono(path: str | Path) -> bytes:
    """Any 8/16/32-bit PCM WAV, any rate, any channel count -> PCM s16le mono 16 kHz."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a PCM WAV file ({exc}); convert it, e.g. `sox in.mp3 -r 16000 -c 1 -b 16 out.wav`") from None
    if width == 1:
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        samples = np.frombuffer(frames, "<i2").astype(np.float32) / 32768
    elif width == 4:
        samples = np.frombuffer(frames, "<i4").astype(np.float32) / 2**31
    else:
        raise WavError(f"{path}: {8 * width}-bit samples are not supported; use 16-bit PCM")
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    if samples.size == 0:
        raise WavError(f"{path}: the file holds no audio")
    if rate != TARGET_RATE:
        duration = samples.size / rate
        target = np.linspace(0, samples.size - 1, int(round(duration * TARGET_RATE)))
        samples = np.interp(target, np.arange(samples.size), samples)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def write_wav(path: str | Path, pcm: bytes, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
