"""Per-turn bookkeeping at the gateway and the `response.done` metrics (PROTOCOL.md §1.1).

`metrics` holds exactly the keys of §1.1; `diagnostics` (beside it in `response.done`) holds the
end-of-speech wait and the pipeline's own overhead, which §1.1 does not name. Every instant is the
gateway's own clock (ms); stage durations come from the workers, so clocks of other machines never
mix in."""
from __future__ import annotations

from dataclasses import dataclass


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
    cancelled: bool = False

    @property
    def complete(self) -> bool:
        return self.text is not None and (self.pieces == 0 or self.audio_done)

    def metrics(self) -> dict[str, float]:
        """PROTOCOL.md §1.1; a stage the turn did not have (speech, for typed text) omits its keys."""
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

    def diagnostics(self) -> dict[str, float]:
        """Where the rest of the time went: the end-of-speech silence wait and the pipeline's overhead."""
        d: dict[str, float | None] = {"pipeline_overhead_ms": self._overhead()}
        if not self.typed:
            d["endpointing_ms"] = _gap(self.speech_end_ms, self.decided_ms)
        return _rounded(d)

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
