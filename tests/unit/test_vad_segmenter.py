"""Segmenter: utterance boundaries from injected VAD decisions."""
from pathlib import Path

import webrtcvad

from voicepipe.wavio import read_audio_16k_mono
from workers.vad_stt.handler import is_speech
from workers.vad_stt.segmenter import Segmenter, SpeechEnd, SpeechPaused, SpeechResumed, SpeechStart, SpeechSustained, frame_db

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


# frames the injected VAD calls voiced (first byte 1) at several levels
LOUD = b"\x01\x10" * 320  # -18 dBFS
HANGOVER = b"\x01\x00" * 320  # -90 dBFS: voiced only by the VAD's hangover
CLICK = b"\x01\x7f" * 320  # about 0 dBFS


def test_an_early_transcript_starts_where_the_energy_ends_not_after_the_vads_hangover():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    events = feed(seg, [LOUD] * 10 + [HANGOVER] * 2)
    assert events == [SpeechStart()]
    (paused,) = feed(seg, [HANGOVER])  # the third frame below the speech: 60 ms of it
    assert isinstance(paused, SpeechPaused) and len(paused.audio) == 13 * 640
    # the rest of the hangover is not speech resuming, and the end still follows the VAD's silence
    assert feed(seg, [HANGOVER] * 3 + [SILENT] * 9) == []
    (end,) = feed(seg, [SILENT], 1000)
    assert isinstance(end, SpeechEnd) and end.audio.startswith(paused.audio)
    assert len(end.audio) == (10 + 6 + 10) * 640


def test_speech_resuming_loud_after_the_offer_makes_it_stale():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    feed(seg, [LOUD] * 10 + [HANGOVER] * 3)
    assert feed(seg, [HANGOVER, LOUD]) == [SpeechResumed()]


def test_quiet_voiced_audio_longer_than_any_hangover_is_speech_going_on():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    events = feed(seg, [LOUD] * 10 + [HANGOVER] * 10)  # 200 ms: a hangover could be this long
    assert [type(e) for e in events] == [SpeechStart, SpeechPaused]
    assert feed(seg, [HANGOVER]) == [SpeechResumed()]  # longer than that: someone speaking softly
    assert feed(seg, [HANGOVER] * 20) == []  # and it goes on being speech, never offered again


def test_a_click_does_not_set_the_speech_level():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    # speech at -42 dBFS with one frame near full scale in it: still speech after the click
    events = feed(seg, [VOICED] * 10 + [CLICK] + [VOICED] * 10)
    assert [type(e) for e in events] == [SpeechStart]


def test_a_background_as_loud_as_the_threshold_leaves_the_vad_alone_to_decide():
    seg = make(end_silence_ms=200, speculate_after_ms=60)
    # hangover frames at -42 dBFS after speech at -18: within 30 dB, so they count as speech
    events = feed(seg, [LOUD] * 10 + [VOICED] * 4 + [SILENT] * 2)
    assert [type(e) for e in events] == [SpeechStart]
    assert isinstance(feed(seg, [SILENT])[0], SpeechPaused)  # 60 ms of the VAD's own silence


def test_real_speech_is_offered_early_by_its_energy_inside_webrtcvads_hangover():
    """webrtcvad keeps calling the frames after a question voiced; the offer comes 60 ms after the
    speech's last loud frame all the same."""
    speech = read_audio_16k_mono(Path(__file__).parents[1] / "fixtures" / "capital.wav")
    speech = speech[: len(speech) // 640 * 640]
    frames = [speech[i : i + 640] for i in range(0, len(speech), 640)] + [SILENT] * 30
    peak = max(frame_db(f) for f in frames)
    last_loud = max(i for i, f in enumerate(frames) if frame_db(f) > peak - 30)
    vad = webrtcvad.Vad(2)
    last_voiced = max(i for i, f in enumerate(frames) if vad.is_speech(f, 16000))
    assert last_voiced >= last_loud + 3  # the hangover this is about (several frames at agg 2)

    vad = webrtcvad.Vad(2)
    seg = Segmenter(lambda f: is_speech(vad, f, 16000), end_silence_ms=300, speculate_after_ms=60, min_utterance_ms=200)
    offered = [i for i, f in enumerate(frames) if any(isinstance(e, SpeechPaused) for e in seg.feed(f, i * 20))]
    assert offered == [last_loud + 3]
