"""The token bucket and a connection's rate limits (gateway/ratelimit.py), on an injected clock."""
import pytest

from gateway.ratelimit import AUDIO_BYTES_PER_S, MIN_AUDIO_FRAME_COST, RateGuard, TokenBucket, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_bucket_starts_full_spends_and_refuses_without_spending():
    clock = Clock()
    bucket = TokenBucket(rate=10, capacity=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    assert bucket.tokens == 0
    assert not bucket.take(0.5)  # a refusal spends nothing
    clock.advance(1 / 16)  # binary fractions keep the arithmetic exact
    assert bucket.take(0.625) and bucket.tokens == 0


def test_a_bucket_refills_at_its_rate_up_to_its_capacity():
    clock = Clock()
    bucket = TokenBucket(rate=10, capacity=5, clock=clock)
    for _ in range(5):
        bucket.take()
    clock.advance(0.25)
    assert bucket.tokens == 2.5
    clock.advance(60)
    assert bucket.tokens == 5  # never more than the burst


def test_a_clock_that_steps_back_refills_nothing():
    clock = Clock()
    bucket = TokenBucket(rate=10, capacity=2, clock=clock)
    bucket.take(2)
    clock.advance(-5)
    assert not bucket.take()
    clock.advance(0.1)  # counted from the stepped-back reading, not from before it
    assert bucket.take()


def test_an_amount_larger_than_the_capacity_never_passes():
    bucket = TokenBucket(rate=100, capacity=10, clock=Clock())
    assert not bucket.take(11)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=1)


def test_text_frames_over_the_rate_are_dropped_with_one_notice_a_second():
    clock = Clock()
    guard = RateGuard(messages_per_s=10, audio_realtime_factor=4, close_after_s=5, clock=clock)
    verdicts = [guard.text() for _ in range(13)]
    assert verdicts[:10] == [Verdict.PASS] * 10
    assert verdicts[10:] == [Verdict.NOTIFY, Verdict.DROP, Verdict.DROP]
    clock.advance(0.5)  # 5 tokens back
    assert [guard.text() for _ in range(6)] == [Verdict.PASS] * 5 + [Verdict.DROP]
    clock.advance(0.5)
    assert [guard.text() for _ in range(6)] == [Verdict.PASS] * 5 + [Verdict.NOTIFY]  # a second after the last notice
    assert guard.dropped == {"text": 5, "audio": 0}


def test_sustained_abuse_is_closed_after_the_close_time():
    clock = Clock()  # 8 frames a second, one token per 1/8 s step; the client sends 5 a step
    guard = RateGuard(messages_per_s=8, audio_realtime_factor=4, close_after_s=2, clock=clock)
    first_close = None
    for step in range(40):
        verdicts = [guard.text() for _ in range(5)]
        if Verdict.CLOSE in verdicts:
            first_close = step
            break
        clock.advance(0.125)
    # the first drop is at step 1 (8 tokens at the start); 2 s of drops later is step 17
    assert first_close == 17


def test_a_quiet_second_between_bursts_ends_the_episode():
    clock = Clock()
    guard = RateGuard(messages_per_s=8, audio_realtime_factor=4, close_after_s=2, clock=clock)
    for _ in range(10):  # 10 s of bursts, each over the rate, each followed by a quiet second
        verdicts = [guard.text() for _ in range(20)]
        assert Verdict.NOTIFY in verdicts and Verdict.CLOSE not in verdicts
        clock.advance(1.0)


def test_audio_is_limited_in_bytes_at_the_factor_with_a_one_second_burst():
    clock = Clock()
    guard = RateGuard(messages_per_s=10, audio_realtime_factor=4, close_after_s=5, clock=clock)
    frame = 640  # 20 ms
    burst = 4 * AUDIO_BYTES_PER_S // frame  # one second at 4x real time
    assert all(guard.audio(frame) is Verdict.PASS for _ in range(burst))
    assert guard.audio(frame) is Verdict.NOTIFY
    clock.advance(1 / 32)  # 31.25 ms at 4x real time: 4000 bytes, six 20 ms frames
    assert [guard.audio(frame) for _ in range(7)] == [Verdict.PASS] * 6 + [Verdict.DROP]
    assert guard.text() is Verdict.PASS  # the two kinds have separate budgets


def test_real_time_audio_never_hits_the_limit_and_empty_frames_still_cost():
    clock = Clock()
    guard = RateGuard(messages_per_s=10, audio_realtime_factor=1.5, close_after_s=5, clock=clock)
    for _ in range(5000):  # 100 s of microphone audio at its own pace
        assert guard.audio(640) is Verdict.PASS
        clock.advance(0.02)
    flood = RateGuard(messages_per_s=10, audio_realtime_factor=1, close_after_s=5, clock=Clock())
    passed = sum(flood.audio(0) is Verdict.PASS for _ in range(10_000))
    assert passed == 65536 // MIN_AUDIO_FRAME_COST  # the burst is one 64 KiB frame here, at 64 bytes a frame


def test_limits_of_zero_are_off():
    guard = RateGuard(messages_per_s=0, audio_realtime_factor=0, close_after_s=0, clock=Clock())
    assert all(guard.text() is Verdict.PASS for _ in range(10_000))
    assert all(guard.audio(65536) is Verdict.PASS for _ in range(1000))


def test_the_burst_holds_at_least_one_largest_frame():
    guard = RateGuard(messages_per_s=10, audio_realtime_factor=0.5, close_after_s=5, max_frame_bytes=65536, clock=Clock())
    assert guard.audio(65536) is Verdict.PASS
