"""The envelope every bus message carries.

No bus message has a use for NaN or infinity, and either would poison the timings computed from
it, so they are refused at decoding like any other malformed field."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.clock import now_ms


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    conversation_id: str
    turn_id: str | None = None
    correlation_id: str = "-"
    timestamp_ms: int = Field(default_factory=now_ms)
    source: str = ""
