"""Turns a stream of PCM frames into utterances. Pure logic: the VAD decision is injected.

It cuts frames at the stream's own rate (`sample_rate`: 16 kHz from `/v1/ws`, 24 kHz from OpenAI
Realtime clients), so a frame ends exactly where the client's audio does; utterances come out at
that rate too, and the worker brings them to whisper's 16 kHz whole.

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
it only by trailing silence, unless `SpeechResumed` came in between. Speculation only pays off when
it starts before the end is decided, so it is off whenever it is not shorter than the end silence.

For that offer, silence begins where the speech's energy ends, not where the VAD says so: webrtcvad
keeps calling frames voiced for a while after speech stops (its hangover: 60-125 ms measured on our
questions, at every frame length and aggressiveness), and every early transcript would start that
much later. A voiced frame more than `QUIET_BELOW_PEAK_DB` below the utterance's loudest (its peak
held over two frames, so a click does not set it) counts as quiet for the offer, unless the VAD
keeps calling such frames voiced for longer than any hangover (`HANGOVER_MAX_MS`): then it is quiet
speech, and counts as speech. Speech resumes, for `SpeechResumed`, by the same measure. Where the
background is as loud as that threshold, nothing is quiet but what the VAD calls unvoiced, as
before. The end of the utterance, `speech_end_ms` and the minimum length still follow the VAD alone,
so turns end exactly as they did and the metrics keep their meaning.

Each conversation's client may choose its turn detection (`configure`): another end silence, or
manual turns, where only the client decides. In manual mode silence never ends an utterance and
nothing short of a commit (or `max_utterance_ms`) does; the utterance is all audio since the last
commit or clear, so it starts with the first frame after one, voiced or not, and it is transcribed
whole however little speech it holds (the client asked for it). No `SpeechSustained` either: in
manual mode speech alone never interrupts a reply. A new setting applies at once when no utterance
is under way, else from the next one: an utterance is segmented by one rule from start to end.

`end_after` changes the silence that ends the utterance under way, from what its early transcript
says (adaptive end of turn, workers/vad_stt/turn_end.py): it holds for that pause only (speech
resuming drops it) and ends the utterance at once when that much silence has passed already.

`clear` drops the utterance under way and everything buffered. An utterance already started ends
with empty audio, as one too short to transcribe does, so its turn ends wherever it was announced."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000  # the pipeline's rate (whisper's); a segmenter may run at its client's rate
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000
QUIET_BELOW_PEAK_DB = 30.0  # a voiced frame this far below the utterance's peak is the VAD's hangover
HANGOVER_MAX_MS = 200  # webrtcvad's hangover is shorter: quiet voiced frames past it are quiet speech


def frame_db(frame: bytes) -> float:
    """A frame's energy in dB relative to full scale (digital silence: -120)."""
    samples = np.frombuffer(frame, dtype="<i2").astype(np.float32)
    return 10 * math.log10(float(np.dot(samples, samples)) / (samples.size * 32768.0**2) + 1e-12)


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
    audio: bytes  # the utterance, pre-roll included; empty when too short to transcribe, or cleared
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
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self._is_speech = is_speech
        self.frame_ms = frame_ms
        self._max_utterance_ms = max_utterance_ms
        self._use_rate(sample_rate)
        self._start_frames = max(1, start_ms // frame_ms)
        self._min_frames = -(-min_utterance_ms // frame_ms)  # ceiling: a 100 ms minimum needs 5 frames of 20 ms
        self._sustain_frames = -(-sustain_ms // frame_ms) if sustain_ms > 0 else 0
        self._hangover_max_frames = -(-HANGOVER_MAX_MS // frame_ms)
        self._speculate_after_ms = speculate_after_ms
        self._next: tuple[int, bool] | None = (end_silence_ms, False)  # settings for the next utterance
        self._apply_next()  # sets _manual, _end_frames, _speculate_frames
        self._paused = False
        self._end_frames_now: int | None = None  # this pause's end silence (`end_after`), in frames
        self._pending = bytearray()
        self._preroll: deque[bytes] = deque(maxlen=max(1, preroll_ms // frame_ms) + self._start_frames)
        self._voiced_run = 0
        self._speaking = False
        self._utterance = bytearray()
        self._silent_frames = 0  # unvoiced frames in a row (the VAD's silence: ends the utterance)
        self._quiet_frames = 0  # frames in a row that are not speech by their energy (for the offer)
        self._hangover_frames = 0  # voiced frames in a row below the peak (the VAD's hangover, or quiet speech)
        self._peak_db = -math.inf  # the utterance's loudest voiced level, held over two frames
        self._prev_db = -math.inf
        self._last_voiced_ms = 0.0
        self._last_frame_ms = 0.0  # receive time of the last whole frame
        self._onset_frame = 0  # frame number of the first voiced frame of the utterance
        self._run_started_ms = 0.0  # receive time of the first frame of the current voiced run
        self._onset_ms = 0.0
        self._last_voiced_frame = 0
        self._voiced_frames = 0  # voiced frames since the onset (in manual mode: in the utterance)
        self._sustained = False
        self.frames_seen = 0

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def manual(self) -> bool:
        """Only a commit ends an utterance (for the utterance under way, not a setting still to apply)."""
        return self._manual

    @property
    def end_silence_ms(self) -> int:
        return self._end_frames * self.frame_ms

    @property
    def speculate_after_ms(self) -> int:
        """Silence after which the utterance is offered early (0: speculation is off)."""
        return self._speculate_frames * self.frame_ms

    def configure(self, *, end_silence_ms: int, manual: bool) -> None:
        """Turn detection from now on: `end_silence_ms` of silence ends an utterance, or (`manual`)
        only a commit does. Applied at once when no utterance is under way, else when it ends."""
        self._next = (end_silence_ms, manual)
        if not self._speaking:
            self._apply_next()

    def _apply_next(self) -> None:
        if self._next is None:
            return
        end_silence_ms, self._manual = self._next
        self._next = None
        self._end_frames = max(1, end_silence_ms // self.frame_ms)
        speculate = self._speculate_after_ms // self.frame_ms
        # an early transcript must start before the end is decided, or it only costs whisper time
        self._speculate_frames = speculate if not self._manual and 0 < speculate < self._end_frames else 0

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
        """End the current utterance now; nothing happens when no speech is under way (in manual
        mode, less than a frame of audio since the last commit is dropped: the next utterance
        starts after the commit)."""
        if not self._speaking:
            if self._manual:
                self._pending.clear()
            return []
        self._utterance += self._pending
        self._pending.clear()
        return [self._end(received_ms)]

    def set_rate(self, sample_rate: int) -> list[Event]:
        """The stream goes on at another rate: what is buffered at the old one is dropped (as by
        `clear`), and frames are cut at the new one from here on."""
        if sample_rate == self.sample_rate:
            return []
        events = self.clear()
        self._use_rate(sample_rate)
        return events

    def _use_rate(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        bytes_per_ms = sample_rate * 2 // 1000
        self._frame_bytes = self.frame_ms * bytes_per_ms
        self._max_bytes = self._max_utterance_ms * bytes_per_ms

    def end_after(self, silence_ms: int) -> list[Event]:
        """This pause of the utterance under way ends it after `silence_ms` of silence instead; at
        once when that much silence has passed already. Nothing in manual mode or when idle."""
        if not self._speaking or self._manual:
            return []
        self._end_frames_now = max(1, silence_ms // self.frame_ms)
        if self._silent_frames >= self._end_frames_now:
            return [self._end(self._last_frame_ms)]
        return []

    def clear(self) -> list[Event]:
        """Drop the utterance under way and everything buffered (pending bytes, pre-roll, the start
        of a voiced run, a pause offered). An utterance already started ends with empty audio."""
        events: list[Event] = []
        if self._speaking:
            events.append(SpeechEnd(audio=b"", speech_end_ms=self._speech_end_ms(), decided_ms=self._last_frame_ms))
        self._pending.clear()
        self._preroll.clear()
        self._reset()
        return events

    def _frame(self, frame: bytes, received_ms: float) -> list[Event]:
        self.frames_seen += 1
        self._last_frame_ms = received_ms
        voiced = self._is_speech(frame)
        db = frame_db(frame)
        held_db, self._prev_db = min(db, self._prev_db), db
        if not self._speaking:
            self._preroll.append(frame)
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run == 1:
                self._run_started_ms = received_ms
            if self._manual or self._voiced_run >= self._start_frames:
                return self._start(received_ms)
            return []
        self._utterance += frame
        events: list[Event] = []
        if voiced:
            if not self._voiced_frames:  # manual mode: the first speech of an utterance begun silent
                self._onset_frame, self._onset_ms = self.frames_seen, received_ms
            self._silent_frames = 0
            self._last_voiced_ms = received_ms
            self._last_voiced_frame = self.frames_seen
            self._voiced_frames += 1
            events += self._sustain()
            self._peak_db = max(self._peak_db, held_db)
        else:
            self._silent_frames += 1
        if self._is_speech_energy(voiced, db):
            self._quiet_frames = 0
            self._end_frames_now = None  # a pause's own end silence goes with the pause
            if self._paused:
                self._paused = False
                events.append(SpeechResumed())
        else:
            self._quiet_frames += 1
        end_frames = self._end_frames_now or self._end_frames
        if (not self._manual and self._silent_frames >= end_frames) or len(self._utterance) >= self._max_bytes:
            return [*events, self._end(received_ms)]
        if self._speculate_frames and self._quiet_frames == self._speculate_frames and self._long_enough():
            self._paused = True
            events.append(SpeechPaused(bytes(self._utterance)))
        return events

    def _is_speech_energy(self, voiced: bool, db: float) -> bool:
        """Voiced by the VAD and loud enough not to be its hangover; or voiced for longer than a
        hangover lasts, however quiet (the module docstring)."""
        if not voiced:
            self._hangover_frames = 0
            return False
        if db >= self._peak_db - QUIET_BELOW_PEAK_DB:
            self._hangover_frames = 0
            return True
        self._hangover_frames += 1
        return self._hangover_frames > self._hangover_max_frames

    def _start(self, received_ms: float) -> list[Event]:
        """Speech starts with this frame: on `start_ms` of voiced audio, or in manual mode on any frame."""
        self._speaking = True
        self._utterance = bytearray(b"".join(self._preroll))
        self._preroll.clear()
        self._silent_frames = 0
        self._voiced_frames = self._voiced_run
        self._voiced_run = 0
        self._sustained = False
        if self._voiced_frames:
            self._last_voiced_ms = received_ms
            self._onset_frame = self.frames_seen - self._voiced_frames + 1
            self._onset_ms = self._run_started_ms
            self._last_voiced_frame = self.frames_seen
        return [SpeechStart(), *self._sustain()]

    def _sustain(self) -> list[Event]:
        if self._manual:  # only the client interrupts a reply
            return []
        if self._sustain_frames and not self._sustained and self._voiced_frames >= self._sustain_frames:
            self._sustained = True
            return [SpeechSustained(self._onset_ms)]
        return []

    def _long_enough(self) -> bool:
        """Onset to last voiced frame spans at least `min_utterance_ms`."""
        return self._last_voiced_frame - self._onset_frame + 1 >= self._min_frames

    def _speech_end_ms(self) -> float:
        """Receive time of the utterance's last voiced frame (of its last frame when none was voiced,
        which only a manual utterance can be)."""
        return self._last_voiced_ms if self._voiced_frames else self._last_frame_ms

    def _end(self, decided_ms: float) -> SpeechEnd:
        # a manual utterance is the client's choice: transcribed whole, however little speech it holds
        audio = bytes(self._utterance) if self._manual or self._long_enough() else b""
        event = SpeechEnd(audio=audio, speech_end_ms=self._speech_end_ms(), decided_ms=decided_ms)
        self._reset()
        return event

    def _reset(self) -> None:
        """Back to idle, and the settings configured meanwhile apply from here."""
        self._speaking = False
        self._paused = False
        self._end_frames_now = None
        self._utterance = bytearray()
        self._voiced_run = 0
        self._voiced_frames = 0
        self._silent_frames = 0
        self._quiet_frames = 0
        self._hangover_frames = 0
        self._peak_db = -math.inf
        self._apply_next()
