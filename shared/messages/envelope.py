"""The envelope every bus message carries."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.clock import now_ms


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    conversation_id: str
    turn_id: str | None = None
    correlation_id: str = "-"
    timestamp_ms: int = Field(default_factory=now_ms)
    source: str = ""
