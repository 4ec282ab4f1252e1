"""Every Redis channel and key name, built in one place.

Channels
  connection_events                 gateway -> all workers (docs/protocol.md §2)
  tts_control                       orchestrator -> all TTS workers (stop a conversation's speech)
  {ns}:control                      gateway -> all workers (introspection requests)
  {ns}:inbox:{stage}:{id}           messages for one process (stage is gateway, vad_stt, llm, tts)
Keys
  {ns}:worker:{stage}:{id}          heartbeat of a live process (JSON, expires)
  {ns}:workers:{stage}              sorted set of process ids by last heartbeat
  {ns}:live                         sorted set: live conversation ids by lease expiry (for the stale sweep)
  {ns}:conv:{cid}                   routing of a live conversation: which process of each stage owns it,
                                    and which socket (connection_id); a lease the gateway refreshes
  {ns}:conv:{cid}:history           hash: chat history (JSON) and resume token, kept for the resume window
  {ns}:conv:{cid}:tts_active        present while TTS speaks for the conversation
Keys of the per-client connection limit (gateway/limits.py)
  {ns}:gateways                     sorted set: gateway ids by heartbeat expiry (ms, Redis server clock)
  {ns}:gateway:{gid}:slots          set: "{client} {slot}" for every connection slot the gateway holds
  {ns}:client:{client}:slots        hash: slot id -> gateway id; a client's counted connections
                                    ({client} is a hash of the client's identity, never a token)
  {ns}:gateway_endpoints            hash: "host:port" -> id of the gateway that last bound it
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.config import Settings


@dataclass(frozen=True)
class Names:
    namespace: str
    connection_events: str
    tts_control: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "Names":
        return cls(settings.namespace, settings.connection_events_channel, settings.tts_control_channel)

    def inbox(self, stage: str, process_id: str) -> str:
        return f"{self.namespace}:inbox:{stage}:{process_id}"

    def worker(self, stage: str, worker_id: str) -> str:
        return f"{self.namespace}:worker:{stage}:{worker_id}"

    def workers(self, stage: str) -> str:
        return f"{self.namespace}:workers:{stage}"

    def conversation(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}"

    def history(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}:history"

    @property
    def control(self) -> str:
        return f"{self.namespace}:control"

    @property
    def live(self) -> str:
        return f"{self.namespace}:live"

    def tts_active(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}:tts_active"

    @property
    def gateways(self) -> str:
        return f"{self.namespace}:gateways"

    def gateway_slots(self, gateway_id: str) -> str:
        return f"{self.namespace}:gateway:{gateway_id}:slots"

    def client_slots(self, client_key: str) -> str:
        return f"{self.namespace}:client:{client_key}:slots"

    @property
    def gateway_endpoints(self) -> str:
        return f"{self.namespace}:gateway_endpoints"

    def conversation_keys_pattern(self, conversation_id: str) -> str:
        """SCAN pattern of the conversation's sub-keys (glob characters in the id are escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in conversation_id)
        return f"{self.namespace}:conv:{escaped}:*"
