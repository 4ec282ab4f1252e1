"""The names of the pipeline's process kinds, once.

A conversation is served by one worker of each stage; the gateway is the process kind that holds
its socket. Every inbox, heartbeat, metric label and route field is spelled from these, so a stage
is never a bare string typed twice. `Stage` is a `StrEnum`: its members are the strings that go on
the wire and into Redis names."""
from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    VAD_STT = "vad_stt"
    LLM = "llm"
    TTS = "tts"


STAGES: tuple[Stage, ...] = tuple(Stage)
GATEWAY = "gateway"  # the process kind that holds client sockets (not a stage of the pipeline)
