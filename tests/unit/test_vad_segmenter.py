"""Segmenter: utterance boundaries from injected VAD decisions."""
from workers.vad_stt.segmenter import Segmenter, SpeechEnd, SpeechPaused, SpeechResumed, SpeechStart, SpeechSustained

VOICED = b"\x01\x01" * 320  # one 20 ms frame
SILENT = bytes(640)


def make(**kw) -> Segmenter:
    defaults = dict(frame_ms=20, start_ms=60, end_silence_ms=100, preroll_ms=40, min_utterance_ms=100, max_utterance_ms=2000)
    defaults.update(kw)
    return Segmenter(lambda frame: frame[0] == 1, **defaults)


def feed(seg: Segmenter, frames: list[bytes], t0: float = 0.0) -> list:
    events = []
    for i, frame in enumerate(frames):
        events += seg.feed(frame, t0 + i * 20)
    return events


def test_speech_starts_after_start_ms_of_voiced_audio():
    seg = make()
    assert feed(seg, [SILENT, VOICED, VOICED]) == []
    assert feed(seg, [VOICED], 60) == [SpeechStart()]
    assert seg.speaking


def test_utterance_ends_after_the_silence_and_carries_preroll_and_timing():
    seg = make()
    events = feed(seg, [SILENT, SILENT, SILENT] + [VOICED] * 10 + [SILENT] * 5)
    start, end = events
    assert start == SpeechStart() and isinstance(end, SpeechEnd)
    assert end.speech_end_ms == 12 * 20  # receive time of the last voiced frame
    assert end.decided_ms == 17 * 20  # the fifth silent frame completes 100 ms of silence
    # pre-roll (2 frames + the start frames) + the rest of the speech + the trailing silence
    assert end.audio.startswith(SILENT * 2 + VOICED * 3) and len(end.audio) == (2 + 10 + 5) * 640
    assert not seg.speaking


def test_a_blip_shorter_than_the_minimum_gives_an_empty_utterance():
    seg = make(min_utterance_ms=200)
    end = [e for e in feed(seg, [VOICED] * 4 + [SILENT] * 5) if isinstance(e, SpeechEnd)][0]
    assert end.audio == b""


def test_max_utterance_forces_an_end():
    seg = make(max_utterance_ms=400)
    events = feed(seg, [VOICED] * 30)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends and len(ends[0].audio) == 400 * 32


def test_commit_ends_now_while_speaking_and_does_nothing_while_idle():
    seg = make()
    assert seg.commit(0) == []
    feed(seg, [VOICED] * 8)
    seg.feed(VOICED[:300], 170)  # a partial frame still pending
    (end,) = seg.commit(180)
    assert isinstance(end, SpeechEnd) and end.decided_ms == 180
    assert len(end.audio) == 8 * 640 + 300


def test_any_even_chunking_gives_the_same_result():
    frames = [SILENT] * 3 + [VOICED] * 12 + [SILENT] * 6
    whole = b"".join(frames)
    reference = [e for e in feed(make(), frames) if isinstance(e, SpeechEnd)][0].audio
    for size in (100, 1000, 64):
        seg = make()
        events = []
        for offset in range(0, len(whole), size):
            events += seg.feed(whole[offset : offset + size], 0)
        assert [e for e in events if isinstance(e, SpeechEnd)][0].audio == reference


def test_speculation_offers_the_utterance_when_silence_begins_and_withdraws_on_resume():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    events = feed(seg, [VOICED] * 8 + [SILENT] * 3)
    paused = events[-1]
    assert isinstance(paused, SpeechPaused) and len(paused.audio) == 11 * 640
    assert feed(seg, [VOICED]) == [SpeechResumed()]
    events = feed(seg, [SILENT] * 10)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechPaused, SpeechEnd]
    assert events[1].audio.startswith(events[0].audio)  # the final one only adds silence


def test_sustained_speech_is_reported_once_after_enough_voiced_frames():
    seg = make(sustain_ms=200)  # 10 frames of 20 ms, counted from the onset
    events = feed(seg, [SILENT, SILENT] + [VOICED] * 9)
    assert events == [SpeechStart()]
    assert feed(seg, [SILENT, VOICED], 220) == [SpeechSustained(onset_ms=40)]  # the first voiced frame's time
    assert feed(seg, [VOICED] * 20) == []  # once per utterance
    assert not any(isinstance(e, SpeechSustained) for e in feed(seg, [SILENT] * 6))


def test_a_noise_burst_is_never_sustained_nor_transcribed_however_long_its_silence():
    seg = make(sustain_ms=200, min_utterance_ms=200, end_silence_ms=300, preroll_ms=200)
    events = feed(seg, [SILENT] * 10 + [VOICED] * 5 + [SILENT] * 20)  # 100 ms of sound
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert events[-1].audio == b""  # pre-roll and trailing silence do not count as speech


def test_sustain_off_by_default_and_at_start_when_shorter_than_the_start():
    assert SpeechSustained() not in feed(make(), [VOICED] * 40)
    assert feed(make(sustain_ms=40), [VOICED] * 3) == [SpeechStart(), SpeechSustained()]
