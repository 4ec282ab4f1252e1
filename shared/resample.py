"""Sample-rate conversion of PCM s16le mono with soxr (a real band-limited resampler).

The pipeline hears at 16 kHz (VAD and whisper), piper speaks at its voice's rate (22.05 kHz for
the shipped voice), and OpenAI-compatible clients send and expect 24 kHz. Linear interpolation
between those rates aliases audibly; soxr's "HQ" filter does not, and costs microseconds per
20 ms chunk. `Resampler` keeps the filter's state between chunks of one stream, so a stream cut
into chunks sounds exactly like the whole converted at once."""
from __future__ import annotations

import numpy as np
import soxr


class Resampler:
    """A streaming converter from `in_rate` to `out_rate` for one audio stream."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16")

    def convert(self, pcm: bytes) -> bytes:
        """The converted audio of `pcm` available so far (the filter holds back a few samples)."""
        if self._stream is None:
            return pcm
        out = self._stream.resample_chunk(np.frombuffer(pcm, dtype="<i2"))
        return out.astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        """The rest, at the end of the stream."""
        if self._stream is None:
            return b""
        out = self._stream.resample_chunk(np.zeros(0, dtype="<i2"), last=True)
        return out.astype("<i2", copy=False).tobytes()


def resample(pcm: bytes, in_rate: int, out_rate: int) -> bytes:
    """Convert a whole clip."""
    if in_rate == out_rate:
        return pcm
    out = soxr.resample(np.frombuffer(pcm, dtype="<i2"), in_rate, out_rate)
    return out.astype("<i2", copy=False).tobytes()
