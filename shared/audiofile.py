"""Audio files in and out, with PyAV (FFmpeg): any format in, the OpenAI speech formats out.

`decode_audio` turns whatever a client uploads or `voicepipe talk` is given (WAV, MP3, OGG/Opus,
FLAC, M4A, WebM...) into PCM s16le mono at the pipeline's rate; FFmpeg's own resampler does the
rate and channel conversion while decoding. A file that FFmpeg cannot read, or that holds no
audio, is an `AudioFileError` with a short message that never quotes the file.

`SpeechEncoder` turns a stream of PCM into one of the response formats of the OpenAI speech API
(`pcm`, `wav`, `mp3`, `opus`, `aac`, `flac`) chunk by chunk, so the first bytes leave as soon as
the first piece is spoken: `pcm` is raw, `wav` is a header whose sizes say "unknown length" (as
streamed WAV is) followed by raw PCM, the rest are encoded by FFmpeg into a container that can be
written without seeking back."""
from __future__ import annotations

import io
from pathlib import Path

import av
import av.error

SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_CONTAINERS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"), "flac": ("flac", "flac")}
_UNKNOWN_SIZE = 0xFFFFFFFF


class AudioFileError(ValueError):
    pass


def decode_audio(source: bytes | str | Path, rate: int = 16000, max_seconds: float | None = None) -> bytes:
    """Every audio stream sample of the file's first audio track as PCM s16le mono at `rate`.

    `max_seconds` bounds the decoded length (longer: AudioFileError), checked while decoding so a
    small file that expands to hours is refused before it is in memory."""
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    limit = None if max_seconds is None else int(max_seconds * rate) * 2
    out = bytearray()
    try:
        with av.open(opened, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioFileError("the file holds no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for converted in resampler.resample(frame):
                    out += bytes(converted.planes[0])[: converted.samples * 2]
                if limit is not None and len(out) > limit:
                    raise AudioFileError(f"the audio is longer than {max_seconds:g} s")
            for converted in resampler.resample(None):
                out += bytes(converted.planes[0])[: converted.samples * 2]
    except FileNotFoundError:
        raise AudioFileError(f"{source}: no such file") from None
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, AudioFileError):
            raise
        raise AudioFileError("the file is not audio in a format that can be decoded") from None
    if not out:
        raise AudioFileError("the file holds no audio")
    if limit is not None and len(out) > limit:
        raise AudioFileError(f"the audio is longer than {max_seconds:g} s")
    return bytes(out)


def wav_header(rate: int, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM s16le mono WAV header; without `data_bytes`, sizes say "unknown" (streamed)."""
    data = _UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff = _UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return (
        b"RIFF" + riff.to_bytes(4, "little") + b"WAVEfmt "
        + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
        + rate.to_bytes(4, "little") + (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little")
        + (16).to_bytes(2, "little") + b"data" + data.to_bytes(4, "little")
    )


class _Sink(io.RawIOBase):
    """Collects what the muxer writes, handed out by `take`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        out, self._buffer = bytes(self._buffer), bytearray()
        return out


class SpeechEncoder:
    """PCM s16le mono at `rate` in, bytes of `format` out, chunk by chunk."""

    def __init__(self, format: str, rate: int) -> None:
        if format not in SPEECH_FORMATS:
            raise ValueError(f"unknown format {format!r}")
        self.format, self.rate = format, rate
        self.media_type = MEDIA_TYPES[format]
        self._started = False
        self._container = None
        if format in _CONTAINERS:
            container_format, codec = _CONTAINERS[format]
            self._sink = _Sink()
            # every packet reaches the sink at once: else the muxer buffers ~32 KB, and ogg a second of pages
            options = {"flush_packets": "1", "page_duration": "20000"} if container_format == "ogg" else {"flush_packets": "1"}
            self._container = av.open(self._sink, mode="w", format=container_format, container_options=options)
            out_rate = 48000 if codec == "libopus" else rate
            self._stream = self._container.add_stream(codec, rate=out_rate, layout="mono")
            self._resampler = av.AudioResampler(format=self._stream.format.name, layout="mono", rate=out_rate)
            self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        if self._container is None:
            head = b""
            if not self._started and self.format == "wav":
                head = wav_header(self.rate)
            self._started = True
            return head + pcm
        if not pcm:
            return b""
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm[: len(pcm) // 2 * 2])
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += frame.samples
        for converted in self._resampler.resample(frame):
            for packet in self._stream.encode(converted):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._container is None:
            return b"" if self._started or self.format != "wav" else wav_header(self.rate)
        for converted in self._resampler.resample(None):
            for packet in self._stream.encode(converted):
                self._container.mux(packet)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        self._started = True
        return self._sink.take()

    def close(self) -> None:
        """Release the encoder without output (the client went away)."""
        if self._container is not None:
            try:
                self._container.close()
            except av.error.FFmpegError:
                pass
            self._container = None
