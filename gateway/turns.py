"""Per-turn bookkeeping at the gateway and the `response.done` metrics (docs/protocol.md §1.1).

A conversation's `TurnTable` holds its few latest turns and remembers a few more that were
interrupted, so late output of an interrupted turn is dropped (fenced); a conversation of 10,000
turns holds about as much as one of ten. The gateway is the one process that knows what the client
was sent, so it also keeps, per turn, how far the reply's audio got (`heard`, in TTS pieces) and
until when the client is still playing it (`playing_until_ms`): barge-in interrupts a reply that
is still generating or still playing.

`metrics` holds exactly the keys of §1.1; `diagnostics` (beside it in `response.done`) holds the
end-of-speech wait and the pipeline's own overhead, which §1.1 does not name. Every instant is the
gateway's own clock (ms); stage durations come from the workers, so clocks of other machines never
mix in."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shared.clock import now_ms_float
from shared.recent import RecentIds

LIVE_TURNS = 8  # turns kept per conversation (the newest)
FENCED_TURNS = 32  # interrupted turns remembered per conversation, to drop their late output
PLAYBACK_MARGIN_MS = 300.0  # the client's own buffering on top of the audio's duration
MAX_MARKS = 4096  # audio chunks of a reply remembered for truncation (minutes of speech)


@dataclass
class Turn:
    turn_id: str
    typed: bool = False
    speech_end_ms: float | None = None  # receive time of the last voiced frame
    decided_ms: float | None = None  # receive time of the frame that ended the utterance
    transcript_ms: float | None = None  # transcript arrived (or typed text received)
    first_token_ms: float | None = None
    first_audio_ms: float | None = None
    stt_ms: float | None = None
    stt_wait_ms: float | None = None
    llm_ms: float | None = None
    llm_first_piece_ms: float | None = None
    tts_ms: float | None = None
    tts_first_chunk_ms: float | None = None
    text: str | None = None
    pieces: int = 0
    audio_done: bool = False
    blocked: bool = False  # the output guard blocked the reply: no more audio of it is sent
    speculative: bool = False  # the reply was started on the early transcript, before the turn ended
    audio_held_ms: float | None = None  # a speculative reply: how long its first audio waited for the turn's end
    replying: bool = False  # a reply was asked for (a non-empty transcript, or typed text)
    done: bool = False  # `response.done` was sent
    sample_rate: int = 0
    heard: float = 0.0  # TTS pieces of the reply whose audio was sent (2.5: two and a half)
    playing_until_ms: float = 0.0  # when the client runs out of the reply's audio sent so far
    audio_ms: float = 0.0  # duration of the reply's audio sent so far
    marks: list[tuple[float, float]] = field(default_factory=list)  # (audio_ms, heard) after each chunk
    opened_ms: float = field(default_factory=now_ms_float)  # when the gateway first heard of the turn

    @property
    def complete(self) -> bool:
        return self.text is not None and (self.pieces == 0 or self.audio_done or self.blocked)

    def audio_sent(self, now_ms: float, pcm_bytes: int, piece: int, piece_end: float) -> None:
        """Account one chunk sent to the client: how far the reply got, and its playback horizon."""
        self.heard = max(self.heard, piece + piece_end)
        if self.sample_rate:
            duration_ms = pcm_bytes * 500 / self.sample_rate
            self.playing_until_ms = max(self.playing_until_ms, now_ms) + duration_ms
            self.audio_ms += duration_ms
            if len(self.marks) < MAX_MARKS:
                self.marks.append((self.audio_ms, self.heard))

    def heard_at(self, audio_ms: float) -> float:
        """How far into the reply (in TTS pieces, like `heard`) its first `audio_ms` of audio got:
        where a client that stopped playing there stopped (Realtime `conversation.item.truncate`)."""
        before_ms, before = 0.0, 0.0
        for at_ms, heard in self.marks:
            if at_ms >= audio_ms:  # inside this chunk: its share of the way from the previous mark
                share = (audio_ms - before_ms) / (at_ms - before_ms) if at_ms > before_ms else 1.0
                return before + (heard - before) * max(0.0, share)
            before_ms, before = at_ms, heard
        return self.heard

    def active(self, now_ms: float) -> bool:
        """The reply is generating, or its audio may still be playing at the client."""
        if not self.replying:
            return False
        return not self.done or now_ms < self.playing_until_ms + PLAYBACK_MARGIN_MS

    def metrics(self) -> dict[str, float]:
        """docs/protocol.md §1.1; a stage the turn did not have (speech, for typed text) omits its keys."""
        m: dict[str, float | None] = {}
        if not self.typed:
            m["speech_end_to_transcript_ms"] = _gap(self.speech_end_ms, self.transcript_ms)
            m["speech_end_to_first_audio_ms"] = _gap(self.speech_end_ms, self.first_audio_ms)
            m["stt_ms"] = self.stt_ms
        m["transcript_to_first_token_ms"] = _gap(self.transcript_ms, self.first_token_ms)
        m["first_token_to_first_audio_ms"] = _gap(self.first_token_ms, self.first_audio_ms)
        m["llm_ms"] = self.llm_ms
        m["tts_ms"] = self.tts_ms if self.pieces else None
        return _rounded(m)

    def diagnostics(self) -> dict[str, float | bool]:
        """Where the rest of the time went: the end-of-speech silence wait and the pipeline's
        overhead; and whether the reply was speculative (and then how long its audio was held)."""
        d: dict[str, float | None] = {"pipeline_overhead_ms": self._overhead()}
        if not self.typed:
            d["endpointing_ms"] = _gap(self.speech_end_ms, self.decided_ms)
        d["audio_held_ms"] = self.audio_held_ms
        diagnostics: dict[str, float | bool] = dict(_rounded(d))
        if self.text is not None:  # a reply was made
            diagnostics["speculative"] = self.speculative
        return diagnostics

    def _overhead(self) -> float | None:
        """Time to first audio not spent in a model or waiting for silence: bus hops, queues, gateway."""
        start = self.transcript_ms if self.typed else self.decided_ms
        parts = [self.llm_first_piece_ms, self.tts_first_chunk_ms] + ([] if self.typed else [self.stt_wait_ms])
        if start is None or self.first_audio_ms is None or any(p is None for p in parts):
            return None
        return max(0.0, self.first_audio_ms - start - sum(parts))


def _rounded(values: dict[str, float | None]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items() if v is not None}


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


class TurnTable:
    """The turns of one conversation, bounded: the newest `LIVE_TURNS`, and `FENCED_TURNS` ids of
    interrupted turns whose late messages are dropped."""

    def __init__(self) -> None:
        self._live: OrderedDict[str, Turn] = OrderedDict()
        self._fenced = RecentIds(FENCED_TURNS)

    def __len__(self) -> int:
        return len(self._live)

    def fenced(self, turn_id: str) -> bool:
        return turn_id in self._fenced

    def get(self, turn_id: str) -> Turn | None:
        return self._live.get(turn_id)

    def open(self, turn_id: str, **fields: object) -> Turn:
        """The turn with this id, created (and the oldest dropped past the bound) when new."""
        turn = self._live.get(turn_id)
        if turn is None:
            turn = self._live[turn_id] = Turn(turn_id, **fields)
            while len(self._live) > LIVE_TURNS:
                self._live.popitem(last=False)
        return turn

    def unfinished(self) -> list[Turn]:
        """Turns whose `response.done` has not been sent."""
        return [t for t in self._live.values() if not t.done]

    def drop(self, turn_id: str) -> None:
        self._live.pop(turn_id, None)

    def fence(self, turn_id: str) -> None:
        """The turn was interrupted: forget it, and drop whatever still arrives for it."""
        self._live.pop(turn_id, None)
        self._fenced.add(turn_id)

    def replied_within(self, now_ms: float, window_ms: float, besides: str | None = None) -> bool:
        """Whether a reply's first audio reached the client less than `window_ms` ago."""
        return any(
            t.first_audio_ms is not None and 0 <= now_ms - t.first_audio_ms < window_ms
            for t in self._live.values()
            if t.turn_id != besides
        )

    def current_reply(self, now_ms: float, besides: str | None = None, asked_by_ms: float | None = None) -> Turn | None:
        """The oldest turn whose reply is generating or playing (the one the user hears); with
        `asked_by_ms`, only a reply asked for by then (speech that began earlier is no barge-in)."""
        return next(
            (
                t
                for t in self._live.values()
                if t.turn_id != besides
                and t.active(now_ms)
                and (asked_by_ms is None or (t.transcript_ms is not None and t.transcript_ms <= asked_by_ms))
            ),
            None,
        )
