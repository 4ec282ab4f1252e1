"""A conversation's route: which process of each stage serves it, and which socket holds it.

The gateway writes it as the routing lease (a Redis hash, `Names.conversation`) when a socket opens
and announces it with `conversation.opened`; the workers read it from either. It changes only when a
stage moves to another worker (a draining worker's hand-off, or the gateway re-routing off a dead
one), and then it is replaced as a whole (`moved`), never edited in place: each holder keeps the
route it was last told. This is the one shape of it, for the gateway and the workers alike."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from shared.channels import Names
from shared.clock import now_ms
from shared.messages import ConversationOpened
from shared.stages import GATEWAY, STAGES, Stage

_ADDRESSABLE = frozenset((*STAGES, GATEWAY))


@dataclass(frozen=True)
class Route:
    conversation_id: str
    correlation_id: str
    connection_id: str  # the socket of the conversation (a resume opens a new one)
    gateway: str
    vad_stt: str
    llm: str
    tts: str

    @classmethod
    def of(cls, fields: Mapping[str, str], conversation_id: str | None = None) -> "Route":
        """The route these fields name (a lease hash, a `conversation.opened`); KeyError if one is
        missing. A lease hash does not hold the conversation id: its key does."""
        values = {name: fields[name] for name in cls.field_names() if name != "conversation_id"}
        return cls(conversation_id=conversation_id or fields["conversation_id"], **values)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(Route))

    def worker(self, stage: Stage | str) -> str:
        """The id of the process serving `stage` (or the gateway, for GATEWAY). A `Stage` is the
        field's name itself (a StrEnum), so this is one attribute read: it runs for every frame."""
        if stage not in _ADDRESSABLE:
            raise ValueError(f"no such stage: {stage!r}")
        return getattr(self, stage)

    def inbox(self, stage: Stage | str, names: Names) -> str:
        """The channel of the process serving `stage` for this conversation."""
        return names.inbox(stage, self.worker(stage))

    def inboxes(self, names: Names) -> list[str]:
        """Every stage's inbox, in stage order (where `conversation.opened` goes)."""
        return [self.inbox(stage, names) for stage in STAGES]

    def moved(self, stage: Stage | str, worker_id: str) -> "Route":
        return dataclasses.replace(self, **{Stage(stage).value: worker_id})

    @property
    def envelope(self) -> dict[str, str]:
        """The fields every bus message of the conversation carries."""
        return {"conversation_id": self.conversation_id, "correlation_id": self.correlation_id}

    def lease(self) -> dict[str, str]:
        """The routing lease's fields (the hash under `Names.conversation`)."""
        return {name: getattr(self, name) for name in self.field_names() if name != "conversation_id"}

    def lease_to_write(self) -> dict[str, str]:
        """The lease as the gateway writes it: the route, and when it was written (`created_ms`,
        which nobody reads back)."""
        return {**self.lease(), "created_ms": str(now_ms())}

    def opened(self) -> ConversationOpened:
        """The announcement of this route to its workers."""
        return ConversationOpened(
            conversation_id=self.conversation_id,
            correlation_id=self.correlation_id,
            connection_id=self.connection_id,
            gateway=self.gateway,
            vad_stt=self.vad_stt,
            llm=self.llm,
            tts=self.tts,
        )
