"""Speech encoding for the OpenAI speech API and soxr resampling: streamed chunk by chunk, and
what comes out decodes back to the same length of audio."""
import io
import wave

import numpy as np
import pytest

from shared.audiofile import SPEECH_FORMATS, AudioFileError, SpeechEncoder, decode_audio
from shared.resample import Resampler, resample

RATE = 24000
TONE = (np.sin(2 * np.pi * 440 * np.arange(2 * RATE) / RATE) * 8000).astype("<i2").tobytes()
CHUNK = 9600  # 200 ms


@pytest.mark.parametrize("fmt", SPEECH_FORMATS)
def test_every_format_streams_and_decodes_back(fmt):
    encoder = SpeechEncoder(fmt, RATE)
    parts = [encoder.encode(TONE[i : i + CHUNK]) for i in range(0, len(TONE), CHUNK)]
    whole = b"".join(parts) + encoder.finish()
    assert parts[0] and parts[2], "audio leaves as it is encoded, not only at the end"
    if fmt == "pcm":
        assert whole == TONE
        return
    seconds = len(decode_audio(whole, RATE)) / 2 / RATE
    assert seconds == pytest.approx(2.0, abs=0.1)


def test_streamed_wav_says_its_rate_and_plays_whole():
    encoder = SpeechEncoder("wav", RATE)
    whole = encoder.encode(TONE[:CHUNK]) + encoder.encode(TONE[CHUNK:]) + encoder.finish()
    with wave.open(io.BytesIO(whole)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
    assert whole[44:] == TONE


def test_decoding_is_bounded_and_errors_are_short():
    with pytest.raises(AudioFileError, match="longer than 1 s"):
        decode_audio(SpeechEncoder("wav", RATE).encode(TONE), 16000, max_seconds=1)
    with pytest.raises(AudioFileError) as error:
        decode_audio(b"RIFF" + b"secret words" * 100)
    assert "secret" not in str(error.value)


def test_streaming_resampler_matches_the_whole_clip():
    stream = Resampler(22050, RATE)
    source = TONE[: 22050 * 2]
    chunked = b"".join(stream.convert(source[i : i + 882]) for i in range(0, len(source), 882)) + stream.flush()
    assert len(chunked) == len(resample(source, 22050, RATE)) == RATE * 2
    assert Resampler(16000, 16000).convert(b"\x01\x02") == b"\x01\x02"

