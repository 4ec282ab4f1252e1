"""The one shape of a conversation's route (shared/route.py): read from a lease hash or an
announcement, replaced as a whole when a stage moves, and addressed by stage."""
from __future__ import annotations

import pytest

from shared.channels import Names
from shared.route import Route
from shared.stages import GATEWAY, STAGES, Stage

NAMES = Names("ns", "connection_events", "tts_control")
ROUTE = Route(conversation_id="c1", correlation_id="k1", connection_id="s1", gateway="g1", vad_stt="v1", llm="l1", tts="t1")


def test_a_lease_hash_and_an_announcement_give_back_the_same_route():
    assert Route.of({**ROUTE.lease(), "created_ms": "5"}, "c1") == ROUTE
    assert Route.of(ROUTE.lease_to_write(), "c1") == ROUTE and "created_ms" in ROUTE.lease_to_write()
    assert Route.of(ROUTE.opened().model_dump()) == ROUTE
    assert "conversation_id" not in ROUTE.lease()  # the lease's key holds it
    with pytest.raises(KeyError):
        Route.of({k: v for k, v in ROUTE.lease().items() if k != "tts"}, "c1")


def test_every_stage_is_addressed_by_its_enum_member():
    assert [str(stage) for stage in STAGES] == ["vad_stt", "llm", "tts"]
    assert ROUTE.inbox(Stage.LLM, NAMES) == "ns:inbox:llm:l1" == ROUTE.inbox("llm", NAMES)
    assert ROUTE.inbox(GATEWAY, NAMES) == "ns:inbox:gateway:g1"
    assert ROUTE.inboxes(NAMES) == ["ns:inbox:vad_stt:v1", "ns:inbox:llm:l1", "ns:inbox:tts:t1"]
    assert ROUTE.envelope == {"conversation_id": "c1", "correlation_id": "k1"}


def test_a_move_replaces_the_route_and_leaves_the_old_one_as_it_was():
    moved = ROUTE.moved(Stage.TTS, "t2")
    assert moved.tts == "t2" and ROUTE.tts == "t1"
    assert moved.opened().tts == "t2" and moved.connection_id == ROUTE.connection_id
