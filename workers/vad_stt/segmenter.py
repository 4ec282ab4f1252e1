"""Turns a stream of PCM frames into utterances. Pure logic: the VAD decision is injected.

Idle, it keeps a short pre-roll; `start_ms` of voiced audio starts speech; `end_silence_ms` of
unvoiced audio (or a commit, or `max_utterance_ms`) ends it. Every frame carries the gateway's
receive time, so "speech end" is the arrival of the last voiced frame.

The length of speech is counted from its onset (the first voiced frame of the run that started it),
never from the pre-roll: an utterance shorter than `min_utterance_ms` from onset to its last voiced
frame is not worth transcribing (a click, a cough). With `sustain_ms` set, `SpeechSustained` says
once per utterance that this many voiced frames were heard since the onset: the signal for barge-in,
which a short noise burst never reaches however long its trailing silence.

With `speculate_after_ms` set, a `SpeechPaused` event offers the utterance as soon as silence
begins, so transcription can overlap the end-of-speech wait; the final utterance then differs from
it only by trailing silence, unless `SpeechResumed` came in between."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SAMPLE_RATE = 16000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000


@dataclass(frozen=True)
class SpeechStart:
    pass


@dataclass(frozen=True)
class SpeechSustained:
    """`sustain_ms` of voiced frames since the onset of this utterance (sent once per utterance).
    `onset_ms` is the receive time of the utterance's first voiced frame."""

    onset_ms: float = 0.0


@dataclass(frozen=True)
class SpeechPaused:
    """Silence began `speculate_after_ms` ago: the utterance so far, worth transcribing early."""

    audio: bytes


@dataclass(frozen=True)
class SpeechResumed:
    """Voiced audio came back after a `SpeechPaused`: any early transcript is stale."""


@dataclass(frozen=True)
class SpeechEnd:
    audio: bytes  # the utterance, pre-roll included; empty when too short to transcribe
    speech_end_ms: float
    decided_ms: float


Event = SpeechStart | SpeechSustained | SpeechPaused | SpeechResumed | SpeechEnd


class Segmenter:
    def __init__(
        self,
        is_speech: Callable[[bytes], bool],
        *,
        frame_ms: int = 20,
        start_ms: int = 60,
        end_silence_ms: int = 300,
        preroll_ms: int = 200,
        min_utterance_ms: int = 200,
        max_utterance_ms: int = 15000,
        speculate_after_ms: int = 0,
        sustain_ms: int = 0,
    ) -> None:
        self._is_speech = is_speech
        self.frame_ms = frame_ms
        self._frame_bytes = frame_ms * BYTES_PER_MS
        self._start_frames = max(1, start_ms // frame_ms)
        self._end_frames = max(1, end_silence_ms // frame_ms)
        self._min_frames = -(-min_utterance_ms // frame_ms)  # ceiling: a 100 ms minimum needs 5 frames of 20 ms
        self._sustain_frames = -(-sustain_ms // frame_ms) if sustain_ms > 0 else 0
        self._max_bytes = max_utterance_ms * BYTES_PER_MS
        self._speculate_frames = speculate_after_ms // frame_ms if 0 < speculate_after_ms < end_silence_ms else 0
        self._paused = False
        self._pending = bytearray()
        self._preroll: deque[bytes] = deque(maxlen=max(1, preroll_ms // frame_ms) + self._start_frames)
        self._voiced_run = 0
        self._speaking = False
        self._utterance = bytearray()
        self._silent_frames = 0
        self._last_voiced_ms = 0.0
        self._onset_frame = 0  # frame number of the first voiced frame of the utterance
        self._run_started_ms = 0.0  # receive time of the first frame of the current voiced run
        self._onset_ms = 0.0
        self._last_voiced_frame = 0
        self._voiced_frames = 0  # voiced frames since the onset
        self._sustained = False
        self.frames_seen = 0

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def utterance(self) -> bytes:
        """The utterance so far (empty when no speech is under way)."""
        return bytes(self._utterance) if self._speaking else b""

    @property
    def buffered_bytes(self) -> int:
        return len(self._pending) + len(self._utterance) + sum(len(f) for f in self._preroll)

    def feed(self, pcm: bytes, received_ms: float) -> list[Event]:
        """Add client audio (any even length); returns the events it completes."""
        self._pending += pcm
        events: list[Event] = []
        size = self._frame_bytes
        while len(self._pending) >= size:
            frame = bytes(self._pending[:size])
            del self._pending[:size]
            events += self._frame(frame, received_ms)
        return events

    def commit(self, received_ms: float) -> list[Event]:
        """End the current utterance now; nothing happens when no speech is under way."""
        if not self._speaking:
            return []
        self._utterance += self._pending
        self._pending.clear()
        return [self._end(received_ms)]

    def _frame(self, frame: bytes, received_ms: float) -> list[Event]:
        self.frames_seen += 1
        voiced = self._is_speech(frame)
        if not self._speaking:
            self._preroll.append(frame)
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run == 1:
                self._run_started_ms = received_ms
            if self._voiced_run >= self._start_frames:
                self._speaking = True
                self._utterance = bytearray(b"".join(self._preroll))
                self._preroll.clear()
                self._silent_frames = 0
                self._last_voiced_ms = received_ms
                self._onset_frame = self.frames_seen - self._voiced_run + 1
                self._onset_ms = self._run_started_ms
                self._last_voiced_frame = self.frames_seen
                self._voiced_frames = self._voiced_run
                self._sustained = False
                return [SpeechStart(), *self._sustain()]
            return []
        self._utterance += frame
        events: list[Event] = []
        if voiced:
            self._silent_frames = 0
            self._last_voiced_ms = received_ms
            self._last_voiced_frame = self.frames_seen
            self._voiced_frames += 1
            events += self._sustain()
            if self._paused:
                self._paused = False
                events.append(SpeechResumed())
        else:
            self._silent_frames += 1
        if self._silent_frames >= self._end_frames or len(self._utterance) >= self._max_bytes:
            return [*events, self._end(received_ms)]
        if self._speculate_frames and self._silent_frames == self._speculate_frames and self._long_enough():
            self._paused = True
            events.append(SpeechPaused(bytes(self._utterance)))
        return events

    def _sustain(self) -> list[Event]:
        if self._sustain_frames and not self._sustained and self._voiced_frames >= self._sustain_frames:
            self._sustained = True
            return [SpeechSustained(self._onset_ms)]
        return []

    def _long_enough(self) -> bool:
        """Onset to last voiced frame spans at least `min_utterance_ms`."""
        return self._last_voiced_frame - self._onset_frame + 1 >= self._min_frames

    def _end(self, decided_ms: float) -> SpeechEnd:
        audio = bytes(self._utterance) if self._long_enough() else b""
        event = SpeechEnd(audio=audio, speech_end_ms=self._last_voiced_ms, decided_ms=decided_ms)
        self._speaking = False
        self._paused = False
        self._utterance = bytearray()
        self._voiced_run = 0
        self._silent_frames = 0
        return event
