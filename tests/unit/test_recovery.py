"""Which turns a worker's resubscription ends (gateway/recovery.py), without Redis: a worker that
subscribed again may have missed messages of the turns that began before and still wait for its stage."""
from __future__ import annotations

from types import SimpleNamespace

from gateway.directory import WorkerInfo
from gateway.recovery import Recovery, waits_on
from gateway.turns import Turn, TurnTable
from shared.route import Route


class FakeConversation:
    def __init__(self, workers: dict[str, str]) -> None:
        self.route = Route(conversation_id="c", correlation_id="k", connection_id="s", gateway="g", **workers)
        self.conversation_id = "c"
        self.correlation_id = "k"
        self.turns = TurnTable()
        self.failed: list[str] = []

    def fail_turns_in_flight(self, code, message, which=None) -> int:
        picked = [t for t in self.turns.unfinished() if which is None or which(t)]
        for turn in picked:
            self.failed.append(turn.turn_id)
            self.turns.fence(turn.turn_id)
        return len(picked)


def gateway_with(session: FakeConversation):
    directory = SimpleNamespace(workers={"vad_stt": [], "llm": [], "tts": []})
    redis = SimpleNamespace(register_script=lambda script: None)
    return SimpleNamespace(redis=redis, directory=directory, conversations={"c": session})


def beat(gateway, stage: str, worker_id: str, subscribed_ms: int) -> None:
    gateway.directory.workers[stage] = [WorkerInfo(worker_id, stage, 0, 0, subscribed_ms=subscribed_ms)]


def test_waits_on_follows_what_a_turn_still_needs():
    typed = Turn("t", typed=True, replying=True)
    spoken = Turn("s")
    assert not waits_on(typed, "vad_stt") and waits_on(spoken, "vad_stt")
    spoken.transcript_ms = 1.0
    assert not waits_on(spoken, "vad_stt") and waits_on(spoken, "llm") and waits_on(spoken, "tts")
    spoken.text, spoken.pieces = "Hello.", 1
    assert not waits_on(spoken, "llm") and waits_on(spoken, "tts")
    spoken.audio_done = True
    assert not waits_on(spoken, "tts")


def test_a_resubscribed_worker_ends_only_the_earlier_turns_that_wait_for_it():
    session = FakeConversation({"vad_stt": "v1", "llm": "l1", "tts": "t1"})
    gateway = gateway_with(session)
    recovery = Recovery(gateway)
    beat(gateway, "llm", "l1", 1000)
    assert recovery.worker_gaps() == []  # first seen: nothing to compare with
    before = session.turns.open("before", typed=True, replying=True)
    before.opened_ms = 1500
    answered = session.turns.open("answered", typed=True, replying=True)
    answered.opened_ms, answered.text = 1500, "done with the text"
    after = session.turns.open("after", typed=True, replying=True)
    after.opened_ms = 2500
    beat(gateway, "llm", "l1", 2000)  # subscribed again at 2000
    assert recovery.worker_gaps() == ["l1"]
    assert session.failed == ["before"]
    assert recovery.worker_gaps() == []  # the same subscription again is no news
    beat(gateway, "vad_stt", "v1", 1000)
    recovery.worker_gaps()
    beat(gateway, "vad_stt", "v1", 3000)  # VAD/STT subscribed again: typed turns do not wait for it
    assert recovery.worker_gaps() == ["v1"] and session.failed == ["before"]


def test_a_worker_missing_from_one_refresh_is_still_compared_when_it_comes_back():
    """After a Redis restart a worker's heartbeat is gone until it beats into the new Redis."""
    session = FakeConversation({"vad_stt": "v1", "llm": "l1", "tts": "t1"})
    gateway = gateway_with(session)
    recovery = Recovery(gateway)
    beat(gateway, "tts", "t1", 1000)
    recovery.worker_gaps()
    gateway.directory.workers["tts"] = []
    recovery.worker_gaps()
    turn = session.turns.open("speaking", typed=True, replying=True)
    turn.opened_ms, turn.text, turn.pieces = 1500, "Hi.", 1
    beat(gateway, "tts", "t1", 2000)
    assert recovery.worker_gaps() == ["t1"] and session.failed == ["speaking"]
