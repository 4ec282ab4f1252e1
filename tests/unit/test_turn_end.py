"""Adaptive end of turn (workers/vad_stt/turn_end.py and `Segmenter.end_after`): what the early
transcript says moves the silence that ends an utterance, within its bounds."""
from __future__ import annotations

from workers.vad_stt.segmenter import Segmenter, SpeechEnd, SpeechPaused
from workers.vad_stt.turn_end import end_silence_ms, punctuation_rule

VOICED, SILENT = b"\x01" * 640, b"\x00" * 640


def test_a_finished_question_looks_complete_and_a_trailing_and_does_not():
    assert punctuation_rule("What is the capital of France?") > 0.9
    assert punctuation_rule("Tell me a fun fact about the moon.") > 0.8
    for open_ in ("I would like to visit Paris and", "Tell me about the weather, and...", "So I was thinking um",
                  "Well,", "I think that the"):
        assert punctuation_rule(open_) <= 0.1, open_
    # a preposition at the end leans open, unless whisper closed the sentence
    assert 0.1 < punctuation_rule("The best way to") < 0.5
    assert punctuation_rule("Where are you from?") > 0.9 and punctuation_rule("What time zone is London in.") > 0.8
    assert punctuation_rule("") == punctuation_rule("   ") == 0.5  # nothing said: no opinion
    assert punctuation_rule("Hello there") == 0.5


def test_the_silence_stays_within_its_bounds_and_is_the_base_without_an_opinion():
    assert end_silence_ms(0.5, 300, 150, 700) == 300
    assert end_silence_ms(1.0, 300, 150, 700) == 150 and end_silence_ms(0.0, 300, 150, 700) == 700
    assert 150 <= end_silence_ms(0.95, 300, 150, 700) < 200
    assert end_silence_ms(0.1, 300, 150, 700) > 600
    assert end_silence_ms(7, 300, 150, 700) == 150 and end_silence_ms(-1, 300, 150, 700) == 700
    assert end_silence_ms(0.95, 300, 300, 300) == 300  # bounds equal to the base: adaptive is off


def segmenter() -> Segmenter:
    return Segmenter(lambda frame: frame == VOICED, end_silence_ms=300, speculate_after_ms=100, min_utterance_ms=100)


def feed(seg: Segmenter, frames: list[bytes], start_ms: float) -> list:
    events = []
    for i, frame in enumerate(frames):
        events += seg.feed(frame, start_ms + i * 20)
    return events


def test_a_shorter_end_after_a_long_enough_pause_ends_the_utterance_at_once():
    seg = segmenter()
    events = feed(seg, [VOICED] * 10 + [SILENT] * 10, 0)  # 200 ms of silence: paused, not ended
    assert any(isinstance(e, SpeechPaused) for e in events) and seg.speaking
    (end,) = seg.end_after(150)
    assert isinstance(end, SpeechEnd) and end.audio
    assert end.decided_ms == 19 * 20 and end.decided_ms - end.speech_end_ms == 200
    assert not seg.speaking and seg.end_after(150) == []  # idle: nothing to end


def test_a_longer_end_holds_for_that_pause_only():
    seg = segmenter()
    feed(seg, [VOICED] * 10 + [SILENT] * 10, 0)
    assert seg.end_after(700) == []
    assert not any(isinstance(e, SpeechEnd) for e in feed(seg, [SILENT] * 20, 400))  # 600 ms: still waiting
    (end,) = [e for e in feed(seg, [SILENT] * 5, 800) if isinstance(e, SpeechEnd)]
    assert end.decided_ms - end.speech_end_ms == 700
    # the next utterance, and a pause after speech resumed, are back to the setting
    events = feed(seg, [VOICED] * 10 + [SILENT] * 15, 2000)
    (end,) = [e for e in events if isinstance(e, SpeechEnd)]
    assert end.decided_ms - end.speech_end_ms == 300
    feed(seg, [VOICED] * 10 + [SILENT] * 6, 4000)
    seg.end_after(700)
    (end,) = [e for e in feed(seg, [VOICED] * 3 + [SILENT] * 15, 4320) if isinstance(e, SpeechEnd)]
    assert end.decided_ms - end.speech_end_ms == 300


def test_manual_turns_are_never_ended_by_it():
    seg = segmenter()
    seg.configure(end_silence_ms=300, manual=True)
    feed(seg, [VOICED] * 10 + [SILENT] * 10, 0)
    assert seg.end_after(20) == [] and seg.speaking


def test_a_24_khz_stream_is_cut_into_frames_at_its_own_rate():
    """OpenAI Realtime clients send 24 kHz: 20 ms is 960 bytes, and the timing is the same."""
    seg = Segmenter(lambda frame: frame[0] == 1, end_silence_ms=300, sample_rate=24000)
    voiced, silent = b"\x01" * 960, b"\x00" * 960
    events = feed(seg, [voiced] * 10 + [silent] * 15, 0)
    (end,) = [e for e in events if isinstance(e, SpeechEnd)]
    assert end.decided_ms - end.speech_end_ms == 300 and len(end.audio) % 960 == 0
    # a rate change starts the stream over: what was buffered at the old rate is dropped
    assert feed(seg, [voiced] * 5, 1000) and seg.speaking
    (dropped,) = seg.set_rate(16000)
    assert isinstance(dropped, SpeechEnd) and dropped.audio == b"" and not seg.speaking
    assert seg.set_rate(16000) == []
