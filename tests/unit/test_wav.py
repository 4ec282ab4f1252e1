"""voicepipe talk's audio reading: any audio file becomes 16 kHz mono; anything else is a clear error."""
import wave

import numpy as np
import pytest

from shared.audiofile import SpeechEncoder
from voicepipe.wavio import WavError, read_audio_16k_mono, write_wav


def make_wav(path, rate, channels, width, seconds=0.5):
    samples = (np.sin(np.linspace(0, 200, int(rate * seconds))) * 0.5)
    data = np.repeat(samples[:, None], channels, axis=1)
    if width == 2:
        raw = (data * 32767).astype("<i2").tobytes()
    else:
        raw = ((data + 1) * 127.5).astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(width), w.setframerate(rate)
        w.writeframes(raw)
    return path


@pytest.mark.parametrize("rate, channels, width", [(16000, 1, 2), (44100, 2, 2), (8000, 1, 1)])
def test_converted_to_16k_mono(tmp_path, rate, channels, width):
    pcm = read_audio_16k_mono(make_wav(tmp_path / "a.wav", rate, channels, width))
    assert abs(len(pcm) / 2 - 8000) <= 32  # the resampler's filter may add or drop a few samples
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 10000


@pytest.mark.parametrize("fmt, suffix", [("mp3", "mp3"), ("opus", "ogg"), ("flac", "flac")])
def test_compressed_formats_are_read(tmp_path, fmt, suffix):
    tone = (np.sin(2 * np.pi * 440 * np.arange(24000) / 24000) * 12000).astype("<i2").tobytes()
    encoder = SpeechEncoder(fmt, 24000)
    (tmp_path / f"a.{suffix}").write_bytes(encoder.encode(tone) + encoder.finish())
    pcm = read_audio_16k_mono(tmp_path / f"a.{suffix}")
    assert 0.95 <= len(pcm) / 2 / 16000 <= 1.1
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 6000


def test_errors_are_clear(tmp_path):
    with pytest.raises(WavError, match="no such file"):
        read_audio_16k_mono(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(WavError, match="not audio in a format that can be decoded"):
        read_audio_16k_mono(tmp_path / "text.wav")


def test_write_round_trip(tmp_path):
    write_wav(tmp_path / "r.wav", bytes(range(200)), 22050)
    with wave.open(str(tmp_path / "r.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.readframes(100)) == (22050, 1, bytes(range(200)))
