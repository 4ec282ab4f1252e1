"""How fast one client may send (docs/protocol.md §1 "Rate limits"): token buckets, and when
being over the limit has gone on long enough to close the socket.

A token bucket rather than a count per wall-clock second: a client that sends 100 frames in the
last 10 ms of one second and 100 in the first 10 ms of the next never exceeds a per-second count
but bursts 200 frames in 20 ms; a bucket of capacity C refilled at R a second allows exactly a
burst of C, then R a second, whatever the alignment. The clock is injected so the rules are
unit-tested without sleeping.

One `RateGuard` per connection keeps two buckets (text frames, audio bytes) and one notion of
abuse: frames are dropped while a bucket is empty, the client hears `rate_limited` at most once a
second per kind (a notice per dropped frame would itself be a flood, outbound), and a client that
keeps getting frames dropped, with no quiet second between drops, for `RATE_LIMIT_CLOSE_S` is
closed with 1008."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable

Clock = Callable[[], float]

AUDIO_BYTES_PER_S = 16000 * 2  # 16 kHz, 16-bit, mono: what real time is for client audio
AUDIO_BURST_S = 1.0  # the audio bucket holds this many seconds at the permitted rate
MIN_AUDIO_FRAME_COST = 64  # bytes a binary frame costs at least, so a flood of empty frames is limited too
QUIET_S = 1.0  # a second without a dropped frame ends an episode of abuse
NOTICE_INTERVAL_S = 1.0  # at most one `rate_limited` error per kind in this time


class TokenBucket:
    """`rate` tokens a second, at most `capacity` saved up; starts full."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._at = clock()

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:  # a clock that steps back refills nothing
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float = 1.0) -> bool:
        """Spend `amount` tokens if there are that many; False (nothing spent) otherwise."""
        self._refill()
        if amount > self._tokens:
            return False
        self._tokens -= amount
        return True


class Verdict(enum.Enum):
    PASS = "pass"  # handle the frame
    DROP = "drop"  # drop it silently (the client was told recently)
    NOTIFY = "notify"  # drop it and send `error` `rate_limited`
    CLOSE = "close"  # over the limit for too long: close with 1008


class RateGuard:
    """The rate limits of one client connection. A limit of 0 or less is off."""

    def __init__(
        self,
        messages_per_s: float,
        audio_realtime_factor: float,
        close_after_s: float,
        *,
        max_frame_bytes: int = 65536,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        self._text = TokenBucket(messages_per_s, messages_per_s, clock) if messages_per_s > 0 else None
        audio_rate = audio_realtime_factor * AUDIO_BYTES_PER_S
        # the burst holds AUDIO_BURST_S at the permitted rate, and never less than one largest frame
        self._audio = (
            TokenBucket(audio_rate, max(audio_rate * AUDIO_BURST_S, max_frame_bytes), clock) if audio_rate > 0 else None
        )
        self._close_after_s = close_after_s
        self._abuse_since: float | None = None
        self._last_drop: float | None = None
        self._last_notice: dict[str, float] = {}
        self.dropped = {"text": 0, "audio": 0}

    def text(self) -> Verdict:
        """One client text frame arrived."""
        if self._text is None or self._text.take():
            return Verdict.PASS
        return self._drop("text")

    def audio(self, nbytes: int) -> Verdict:
        """One client binary frame of `nbytes` arrived."""
        if self._audio is None or self._audio.take(max(nbytes, MIN_AUDIO_FRAME_COST)):
            return Verdict.PASS
        return self._drop("audio")

    def _drop(self, kind: str) -> Verdict:
        now = self._clock()
        self.dropped[kind] += 1
        if self._last_drop is None or now - self._last_drop >= QUIET_S:
            self._abuse_since = now  # a new episode
        self._last_drop = now
        if self._close_after_s > 0 and now - self._abuse_since >= self._close_after_s:
            return Verdict.CLOSE
        last = self._last_notice.get(kind)
        if last is None or now - last >= NOTICE_INTERVAL_S:
            self._last_notice[kind] = now
            return Verdict.NOTIFY
        return Verdict.DROP
