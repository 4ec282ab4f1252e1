"""Reading any audio file as 16 kHz mono s16le (through PyAV, shared/audiofile.py), and writing
reply audio as WAV."""
from __future__ import annotations

import wave
from pathlib import Path

from shared.audiofile import AudioFileError, decode_audio

TARGET_RATE = 16000
MAX_SECONDS = 600  # `talk` sends a question, not an audiobook


class WavError(ValueError):
    pass


def read_audio_16k_mono(path: str | Path) -> bytes:
    """Any audio file PyAV reads (WAV, MP3, OGG, FLAC, M4A...), any rate and channel count ->
    PCM s16le mono 16 kHz."""
    try:
        return decode_audio(Path(path), TARGET_RATE, max_seconds=MAX_SECONDS)
    except AudioFileError as exc:
        if not Path(path).exists():
            raise WavError(f"{path}: no such file") from None
        raise WavError(f"{path}: {exc}") from None



def write_wav(path: str | Path, pcm: bytes, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
