"""response.done metrics (PROTOCOL.md §1.1), all on the gateway's clock."""
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
    }  # exactly PROTOCOL.md §1.1
    d = spoken().diagnostics()
    assert d == {"endpointing_ms": 300, "pipeline_overhead_ms": 500 - 90 - 150 - 120}


def test_typed_turn_omits_the_speech_stage():
    turn = Turn("t", typed=True, transcript_ms=0, first_token_ms=50, first_audio_ms=300, llm_ms=400,
                llm_first_piece_ms=100, tts_ms=150, tts_first_chunk_ms=140, text="x", pieces=1)
    m = turn.metrics()
    assert not {"stt_ms", "speech_end_to_transcript_ms", "speech_end_to_first_audio_ms"} & set(m)
    assert m["transcript_to_first_token_ms"] == 50
    assert turn.diagnostics() == {"pipeline_overhead_ms": 60}


def test_completion_waits_for_audio_only_when_audio_was_promised():
    turn = Turn("t")
    assert not turn.complete
    turn.text, turn.pieces = "", 0
    assert turn.complete
    turn.pieces = 2
    assert not turn.complete
    turn.audio_done = True
    assert turn.complete
