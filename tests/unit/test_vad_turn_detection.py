"""Segmenter: the turn detection a client chooses (end silence, manual turns) and clearing the input."""
from workers.vad_stt.segmenter import Segmenter, SpeechEnd, SpeechPaused, SpeechStart, SpeechSustained

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


def ends(events: list) -> list[SpeechEnd]:
    return [e for e in events if isinstance(e, SpeechEnd)]


# ---- end silence


def test_a_configured_end_silence_replaces_the_default():
    seg = make()
    seg.configure(end_silence_ms=400, manual=False)
    assert seg.end_silence_ms == 400
    events = feed(seg, [VOICED] * 10 + [SILENT] * 19)
    assert [type(e) for e in events] == [SpeechStart]  # 380 ms of silence: the default would have ended it long ago
    (end,) = feed(seg, [SILENT], 29 * 20)
    assert end.speech_end_ms == 9 * 20 and end.decided_ms == 29 * 20
    seg.configure(end_silence_ms=100, manual=False)  # back: five silent frames end it again
    events = feed(seg, [VOICED] * 10 + [SILENT] * 5, 1000)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]


def test_speculation_stays_below_the_end_silence_or_is_off():
    seg = make(end_silence_ms=300, speculate_after_ms=100)
    assert seg.speculate_after_ms == 100
    seg.configure(end_silence_ms=80, manual=False)
    assert seg.speculate_after_ms == 0  # it could only start after the end was decided
    events = feed(seg, [VOICED] * 10 + [SILENT] * 4)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    seg.configure(end_silence_ms=800, manual=False)
    assert seg.speculate_after_ms == 100
    events = feed(seg, [VOICED] * 10 + [SILENT] * 5, 1000)
    assert [type(e) for e in events] == [SpeechStart, SpeechPaused]


def test_a_new_setting_waits_for_the_utterance_under_way_to_end():
    seg = make()
    feed(seg, [VOICED] * 5)
    assert seg.speaking
    seg.configure(end_silence_ms=1000, manual=False)
    assert ends(feed(seg, [SILENT] * 5, 100))  # this utterance keeps the rule it started with
    assert seg.end_silence_ms == 1000
    assert not ends(feed(seg, [VOICED] * 5 + [SILENT] * 20, 1000))


# ---- manual turns


def test_manual_mode_never_ends_on_silence_and_commit_ends_it_with_all_audio_since_the_last_commit():
    seg = make(sustain_ms=100, max_utterance_ms=10_000)
    seg.configure(end_silence_ms=100, manual=True)
    assert seg.manual and seg.speculate_after_ms == 0
    frames = [SILENT] * 3 + [VOICED] * 20 + [SILENT] * 100  # two seconds of silence after the speech
    events = feed(seg, frames)
    assert events == [SpeechStart()]  # with the first frame, silent as it is; never sustained
    assert seg.speaking
    (end,) = seg.commit(5000)
    assert end.audio == b"".join(frames)  # from the first frame after the commit, nothing dropped
    assert end.speech_end_ms == 22 * 20  # the last voiced frame
    assert end.decided_ms == 5000
    # the next utterance is what came after that commit, and only that
    more = [VOICED] * 3 + [SILENT] * 2
    assert feed(seg, more, 6000) == [SpeechStart()]
    (end,) = seg.commit(7000)
    assert end.audio == b"".join(more) and end.speech_end_ms == 6000 + 2 * 20


def test_manual_mode_transcribes_an_utterance_without_any_speech():
    seg = make()
    seg.configure(end_silence_ms=100, manual=True)
    assert feed(seg, [SILENT] * 4, 100) == [SpeechStart()]
    (end,) = seg.commit(500)
    assert end.audio == SILENT * 4  # the client committed it: whisper decides, not the VAD
    assert end.speech_end_ms == 160  # no voiced frame: the last frame
    # a short blip is transcribed too (no minimum length in manual mode)
    feed(seg, [VOICED, SILENT], 600)
    (end,) = seg.commit(700)
    assert end.audio == VOICED + SILENT and end.speech_end_ms == 600


def test_manual_mode_keeps_the_maximum_length_and_a_commit_drops_a_partial_frame_left_alone():
    seg = make(max_utterance_ms=400)
    seg.configure(end_silence_ms=100, manual=True)
    events = feed(seg, [SILENT] * 25)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, SpeechStart]
    assert len(ends(events)[0].audio) == 400 * 32
    seg.commit(1000)
    seg.feed(SILENT[:100], 1000)  # less than a frame
    assert not seg.speaking
    assert seg.commit(1010) == []
    assert seg.buffered_bytes == 0  # not carried into the next utterance


def test_switching_to_manual_mid_utterance_applies_from_the_next_one():
    seg = make()
    feed(seg, [VOICED] * 5)
    seg.configure(end_silence_ms=100, manual=True)
    assert not seg.manual
    (end,) = ends(feed(seg, [SILENT] * 5, 100))  # still ended by the VAD
    assert end.audio and seg.manual
    assert feed(seg, [SILENT] * 30, 200) == [SpeechStart()]
    seg.configure(end_silence_ms=100, manual=False)  # and back: this manual utterance ends on commit
    assert seg.manual and feed(seg, [SILENT] * 10, 800) == []
    (end,) = seg.commit(1000)
    assert len(end.audio) == 40 * 640
    assert not seg.manual
    assert feed(seg, [SILENT] * 10, 1100) == []  # server VAD again: silence starts nothing


# ---- clear


def test_clear_drops_the_utterance_under_way_and_everything_buffered():
    seg = make(end_silence_ms=300, speculate_after_ms=60)
    events = feed(seg, [SILENT] * 2 + [VOICED] * 10 + [SILENT] * 3)
    assert isinstance(events[-1], SpeechPaused)
    seg.feed(VOICED[:100], 300)
    (end,) = seg.clear()
    assert end == SpeechEnd(audio=b"", speech_end_ms=11 * 20, decided_ms=14 * 20)  # ends empty, like a blip
    assert not seg.speaking and seg.utterance == b"" and seg.buffered_bytes == 0
    # nothing of before carries over: no resume, and a new utterance has no pre-roll from before the clear
    events = feed(seg, [VOICED] * 3 + [SILENT] * 15, 1000)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert ends(events)[0].audio == b""  # three voiced frames: shorter than the minimum
    seg.feed(SILENT[:100], 2000)
    assert seg.clear() == [] and seg.buffered_bytes == 0  # idle: nothing to end, the buffers emptied


def test_clear_drops_a_voiced_run_that_had_not_started_speech_yet():
    seg = make()
    feed(seg, [VOICED] * 2)
    assert seg.clear() == []
    assert feed(seg, [VOICED], 100) == []  # one voiced frame, not the third of a run


def test_clear_in_manual_mode_starts_the_next_utterance_afresh():
    seg = make()
    seg.configure(end_silence_ms=100, manual=True)
    feed(seg, [VOICED] * 4 + [SILENT] * 4)
    (end,) = seg.clear()
    assert end.audio == b"" and end.speech_end_ms == 3 * 20
    assert feed(seg, [SILENT, VOICED], 1000) == [SpeechStart()]
    (end,) = seg.commit(1100)
    assert end.audio == SILENT + VOICED


def test_server_vad_is_unchanged_by_default():
    seg = make(sustain_ms=100)
    assert not seg.manual and seg.end_silence_ms == 100
    events = feed(seg, [VOICED] * 6 + [SILENT] * 5)
    assert [type(e) for e in events] == [SpeechStart, SpeechSustained, SpeechEnd]
