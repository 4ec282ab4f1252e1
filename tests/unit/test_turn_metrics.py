"""response.done metrics (docs/protocol.md §1.1), all on the gateway's clock."""
import pytest

from gateway.turns import Turn


def spoken() -> Turn:
    return Turn(
        "t", speech_end_ms=1000, decided_ms=1300, transcript_ms=1400, first_token_ms=1500, first_audio_ms=1800,
        stt_ms=250, stt_wait_ms=90, llm_ms=700, llm_first_piece_ms=150, tts_ms=400, tts_first_chunk_ms=120,
        text="Hi.", pieces=1, audio_done=True,
    )


def test_spoken_turn_metrics():
    m = spoken().metrics()
    assert m["speech_end_to_transcript_ms"] == 400
    assert m["transcript_to_first_token_ms"] == 100
    assert m["first_token_to_first_audio_ms"] == 300
    assert m["speech_end_to_first_audio_ms"] == 800
    assert (m["stt_ms"], m["llm_ms"], m["tts_ms"]) == (250, 700, 400)
    assert set(m) == {
        "speech_end_to_transcript_ms", "transcript_to_first_token_ms", "first_token_to_first_audio_ms",
        "speech_end_to_first_audio_ms", "stt_ms", "llm_ms", "tts_ms",
    }  # exactly docs/protocol.md §1.1
    d = spoken().diagnostics()
    assert d == {"endpointing_ms": 300, "pipeline_overhead_ms": 500 - 90 - 150 - 120, "speculative": False}


def test_a_speculative_reply_says_so_and_how_long_its_audio_was_held():
    turn = spoken()
    turn.speculative, turn.audio_held_ms = True, 87.26
    d = turn.diagnostics()
    assert d["speculative"] is True and d["audio_held_ms"] == 87.3
    assert "speculative" not in Turn("t").diagnostics()  # no reply made: nothing to say


def test_typed_turn_omits_the_speech_stage():
    turn = Turn("t", typed=True, transcript_ms=0, first_token_ms=50, first_audio_ms=300, llm_ms=400,
                llm_first_piece_ms=100, tts_ms=150, tts_first_chunk_ms=140, text="x", pieces=1)
    m = turn.metrics()
    assert not {"stt_ms", "speech_end_to_transcript_ms", "speech_end_to_first_audio_ms"} & set(m)
    assert m["transcript_to_first_token_ms"] == 50
    assert turn.diagnostics() == {"pipeline_overhead_ms": 60, "speculative": False}


def test_completion_waits_for_audio_only_when_audio_was_promised():
    turn = Turn("t")
    assert not turn.complete
    turn.text, turn.pieces = "", 0
    assert turn.complete
    turn.pieces = 2
    assert not turn.complete
    turn.audio_done = True
    assert turn.complete


def test_turn_table_is_bounded_and_fences_interrupted_turns():
    from gateway.turns import FENCED_TURNS, LIVE_TURNS, TurnTable

    table = TurnTable()
    for i in range(10_000):
        table.open(f"t{i}", replying=True)
        if i % 2:
            table.fence(f"t{i}")
    assert len(table) <= LIVE_TURNS and len(table._fenced) == FENCED_TURNS
    assert table.fenced("t9999") and not table.fenced("t1")  # only the latest are remembered
    assert table.get("t9998") is not None


def test_the_current_reply_is_generating_or_still_playing():
    from gateway.turns import PLAYBACK_MARGIN_MS, TurnTable

    table = TurnTable()
    spoken = table.open("a", replying=True, sample_rate=16000)
    assert table.current_reply(0) is spoken and table.current_reply(0, besides="a") is None
    spoken.audio_sent(1000, 32000, piece=0, piece_end=0.5)  # one second of audio from t=1000
    spoken.audio_sent(1000, 32000, piece=1, piece_end=1.0)  # and another, queued behind it
    assert spoken.heard == 2.0 and spoken.playing_until_ms == 3000
    spoken.done = True
    assert table.current_reply(2900 + PLAYBACK_MARGIN_MS) is spoken
    assert table.current_reply(3001 + PLAYBACK_MARGIN_MS) is None
    table.open("b")  # a turn with no reply asked for (speech that gave no transcript) is never current
    assert table.current_reply(5000) is None
    typed = table.open("c", replying=True, transcript_ms=6000)
    assert table.current_reply(6100) is typed
    assert table.current_reply(6100, asked_by_ms=5990) is None  # speech that began before it was asked


def test_heard_at_maps_played_audio_to_pieces_of_the_reply():
    """conversation.item.truncate names milliseconds of audio; the history is cut in TTS pieces."""
    turn = Turn("t", sample_rate=16000)
    turn.audio_sent(0.0, 16000, 0, 0.5)  # 500 ms: half of the first piece
    turn.audio_sent(0.0, 16000, 0, 1.0)  # 500 ms more: the whole first piece
    turn.audio_sent(0.0, 32000, 1, 1.0)  # 1 s: the whole second piece
    assert turn.heard_at(0) == 0.0
    assert turn.heard_at(250) == pytest.approx(0.25)
    assert turn.heard_at(1000) == pytest.approx(1.0)
    assert turn.heard_at(1500) == pytest.approx(1.5)
    assert turn.heard_at(60_000) == turn.heard == 2.0  # past the end: all of it


def test_replied_within_finds_a_reply_that_just_started():
    """A turn resumed this soon after a reply's first audio counts as cut too early (gateway metric)."""
    from gateway.turns import TurnTable

    table = TurnTable()
    reply = table.open("r", replying=True)
    assert not table.replied_within(1000.0, 1000.0)  # no audio yet
    reply.first_audio_ms = 500.0
    assert table.replied_within(1400.0, 1000.0)
    assert not table.replied_within(1500.0, 1000.0)  # a whole second later: the user waited for it
    assert not table.replied_within(1400.0, 1000.0, besides="r")
