"""The conversation core: one live conversation at the gateway, whatever protocol its client speaks.

A conversation here is its route (which worker of each stage serves it), its turns, its routing
lease, and the translation between the bus and a small vocabulary of events. A wire protocol
(gateway/voicepipe_ws.py for `/v1/ws`, gateway/realtime.py for `/v1/realtime`) drives it with a few
calls (`audio`, `commit`, `clear`, `say`, `cancel`, `truncate`, `configure`) and hears what happens
through its `Wire`: `event(kind, turn_id, fields)` with the kinds below, `audio(turn_id, pcm)` for
reply audio at the voice's rate, and `close`. The core never imports a protocol, so everything that
makes a conversation dependable is written once: fencing of interrupted turns, barge-in, the
`response.done` metrics, re-routing off dead workers (gateway/reroute.py), surviving a Redis
outage (gateway/recovery.py), the lease, and the one end of the conversation (gateway/hub.py).

Event kinds (the fields in brackets): `speech.started`, `speech.stopped`, `transcript.partial`
[text], `transcript.final` [text], `response.text.delta` [delta], `response.blocked` [reason],
`response.audio.started` [sample_rate], `response.audio.done`, `response.interrupted` [reason:
barge_in | cancelled | truncated], `response.done` [text, metrics, diagnostics], `error` [code,
message, source?]. They are the `/v1/ws` protocol's own events (docs/protocol.md §1); a turn that
fails gets `error` then `response.done`, an interrupted one gets `response.interrupted` and nothing
after it."""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from redis.exceptions import RedisError

from gateway.reroute import TURN_ENDING_CODES
from gateway.turns import Turn, TurnTable
from shared.clock import now_ms_float
from shared.logging import log_context
from shared.messages import (
    AudioClear,
    AudioCommit,
    AudioIn,
    BusMessage,
    ConversationConfigured,
    ConversationOpened,
    ResponseBlocked,
    ResponseCancel,
    ResponseTextDelta,
    ResponseTextDone,
    SessionTakeover,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    StageError,
    TextInput,
    TranscriptFinal,
    TranscriptPartial,
    TtsAudio,
    TtsAudioDone,
    TtsAudioStarted,
)
from shared.messages.audio import InputRate
from shared.route import Route
from shared.stages import Stage
from shared.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.hub import Gateway

log = logging.getLogger("voicepipe.gateway.conversation")

RESUMED_EARLY_MS = 1000.0  # speech this soon after a reply's first audio: the user had not finished


class Wire(Protocol):
    """What a wire protocol gives the core: where the conversation's events go."""

    def event(self, kind: str, turn_id: str | None, fields: dict[str, Any]) -> None:
        """Queue one event for the client (never blocks)."""

    def audio(self, turn_id: str, pcm: bytes) -> None:
        """Queue reply audio: PCM s16le mono at the rate `response.audio.started` named."""

    async def close(self, code: int, reason: str) -> None:
        """Close the client's socket (a no-op once it is closed)."""

    async def refuse(self, code: str, message: str, close_code: int, close_reason: str) -> None:
        """The conversation cannot be served (gateway/hub.py): tell the client why, and close."""


class Conversation:
    def __init__(
        self, gateway: Gateway, route: Route, resume_token: str, wire: Wire, resumed: bool = False
    ) -> None:
        self.gateway = gateway
        self.route = route
        self.resume_token = resume_token  # what the client resumes with (Redis keeps only its digest)
        self.resumed = resumed
        self.wire = wire
        self.conversation_id = route.conversation_id
        self.correlation_id = route.correlation_id
        self.turns = TurnTable()
        self.barge_in = gateway.settings.barge_in_min_speech_ms > 0
        self.shutting_down = False
        self.unavailable: set[str] = set()  # stages with no live worker for this conversation (gateway/reroute.py)
        self.unavailable_told = 0.0  # when the client was last told so about its audio (time.monotonic())
        self.routing_unsure = False  # Redis was lost since the routing was written (gateway/recovery.py)
        self.settings: ConversationConfigured | None = None  # what the client chose, if anything
        self._tasks = TaskSet(f"conversation:{self.conversation_id}")
        self._ended = asyncio.Event()
        self._told_bus_down = False  # the client was told its audio is dropped while Redis is down
        self._envelope = route.envelope  # the same for every route the conversation will have

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def envelope(self) -> dict[str, str]:
        return self._envelope

    def inbox(self, stage: Stage) -> str:
        return self.route.inbox(stage, self.gateway.names)

    # ---- out to the client
    def emit(self, kind: str, turn_id: str | None = None, *, source: str | None = None, **fields: Any) -> None:
        """One event for the client; `source`: the worker whose bus message it relays (for metrics)."""
        if kind == "error":
            self.gateway.metrics.error_sent(str(fields.get("code")), source)
        self.wire.event(kind, turn_id, fields)

    async def close(self, code: int, reason: str = "") -> None:
        await self.wire.close(code, reason)

    # ---- the life of the conversation
    async def serve(self, run: Callable[[Conversation], Awaitable[str]]) -> str:
        """Run the protocol's side (`run`, which returns the disconnect reason) with the lease kept
        alive beside it; returns that reason."""
        lease = asyncio.create_task(self._lease_loop(), name=f"conversation:{self.conversation_id}:lease")
        try:
            return await run(self)
        finally:
            self._ended.set()
            await self._tasks.aclose()
            await lease  # stops by itself: never cancelled inside a Redis call

    async def _lease_loop(self) -> None:
        """Refresh the routing lease until the conversation ends."""
        interval = max(0.5, self.gateway.settings.stale_timeout_s / 3)
        while True:
            try:
                await asyncio.wait_for(self._ended.wait(), interval)
                return
            except TimeoutError:
                pass
            try:
                if not await self.gateway.refresh_lease(self.conversation_id):
                    await self.gateway.recovery.reestablish([self])  # Redis lost it (gateway/recovery.py)
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the routing lease: %s", exc)

    def follow(self, route: Route) -> None:
        """The conversation is served by this route from now on (a stage moved to another worker:
        re-routed here, or handed off by a draining worker), and a new worker hears the client's
        settings."""
        self.route = route
        self.announce_settings()

    def announce_settings(self) -> None:
        """Tell the conversation's workers its settings again (after its route changed or its
        routing was written again): a new owner must not serve it with the defaults."""
        if self.settings is not None:
            self._tasks.spawn(self._publish_settings(), name="settings")

    # ---- in from the client
    async def audio(self, pcm: bytes, sample_rate: InputRate = 16000) -> None:
        """Client audio, PCM s16le mono at `sample_rate` (16 or 24 kHz), any whole number of samples."""
        if len(pcm) % 2:
            self.emit("error", code="bad_audio", message=f"audio frame of {len(pcm)} bytes is not whole 16-bit samples")
            return
        if not self.gateway.bus_health.up:  # dropped, and the client told once per outage
            if not self._told_bus_down:
                self._told_bus_down = True
                self.emit("error", code="bus_unavailable", message="the message bus is down; audio is dropped until it is back")
            return
        self._told_bus_down = False
        if self.routing_unsure:  # a worker drops input of a conversation it finds no routing for
            try:
                await self.gateway.recovery.reestablish([self])
            except (RedisError, OSError) as exc:
                log.warning("could not write the routing again; audio dropped: %s", exc)
                return
        if pcm and self.unavailable:
            self.gateway.rerouter.refuse_audio(self)
        elif pcm:
            rate = None if sample_rate == 16000 else sample_rate
            self._uplink(AudioIn(received_ms=now_ms_float(), pcm=pcm, sample_rate=rate, **self.envelope))

    def commit(self) -> None:
        """End the utterance under way now (behind the audio sent before it, on the same uplink)."""
        if self.unavailable:
            self.gateway.rerouter.refuse_audio(self)
        else:
            self._uplink(AudioCommit(received_ms=now_ms_float(), **self.envelope))

    def clear(self) -> None:
        """Drop the utterance under way, unanswered."""
        if not self.unavailable:
            self._uplink(AudioClear(**self.envelope))

    def _uplink(self, message: AudioIn | AudioCommit | AudioClear | ConversationConfigured) -> None:
        self.gateway.uplink.send(self.inbox(Stage.VAD_STT), self.gateway.bus.encode(message))

    async def configure(
        self,
        turn_detection: Literal["server_vad", "manual"] = "server_vad",
        end_silence_ms: int | None = None,
        instructions: str | None = None,
    ) -> None:
        """The client's settings for this conversation: how its turns end, and the instructions
        that replace the system prompt. Sent to the VAD/STT and LLM workers, and again whenever
        either moves."""
        self.settings = ConversationConfigured(
            turn_detection=turn_detection, end_silence_ms=end_silence_ms, instructions=instructions, **self.envelope
        )
        await self._publish_settings()

    async def _publish_settings(self) -> None:
        settings = self.settings
        if settings is None:
            return
        self._uplink(settings)  # in order with the audio: it applies from the next frame on
        await self._publish_to_llm(settings)

    async def say(self, text: str) -> str:
        """A typed user turn; returns its turn id. It interrupts a reply under way, like speech
        (unless barge-in is off: then it waits for that reply); the cancel reaches the
        orchestrator first."""
        gateway, bus = self.gateway, self.gateway.bus
        # Redis was lost since the routing was written, or is just back: let the bus settle first
        settling = self.routing_unsure or not gateway.inbox_live or gateway.recovery.settling()
        if settling:
            await gateway.recovery.settle(self)
        turn_id = uuid.uuid4().hex[:16]
        now = now_ms_float()
        reply = self.turns.current_reply(now) if self.barge_in else None
        turn = self.turns.open(turn_id, typed=True, transcript_ms=now, replying=True)
        if self.unavailable:
            gateway.rerouter.refuse_turn(self, turn)
            return turn_id
        inbox = self.inbox(Stage.LLM)
        text_input = TextInput(turn_id=turn_id, text=text, **self.envelope)
        try:
            if self.routing_unsure:  # the orchestrator drops a turn of a conversation it finds no routing for
                await gateway.recovery.reestablish([self])
            if reply is not None:
                receivers = (await bus.publish_many([(inbox, self._interrupt(reply, "barge_in")), (inbox, text_input)]))[-1]
            elif settling:  # the orchestrator may still be subscribing again
                await gateway.recovery.publish_when_heard(inbox, text_input)
                turn.opened_ms = now_ms_float()  # it was heard from now on
                receivers = 1
            else:
                receivers = await bus.publish(inbox, text_input)
        except (RedisError, OSError) as exc:
            log.warning("could not publish the typed turn: %s", exc)
            self.fail_turn(turn_id, "bus_unavailable", "the message bus is down; try again in a moment")
            return turn_id
        if not receivers:  # the orchestrator is gone: the turn ends now, not in silence
            await gateway.rerouter.unreached(self, Stage.LLM, turn)
        return turn_id

    async def cancel(self) -> str | None:
        """Stop the reply the user hears (generating or still playing); returns its turn id, or
        None when there is none."""
        reply = self.turns.current_reply(now_ms_float())
        if reply is None:
            return None
        await self._publish_to_llm(self._interrupt(reply, "cancelled"))
        return reply.turn_id

    async def truncate(self, turn_id: str, audio_ms: float) -> bool:
        """The client played only the first `audio_ms` of the turn's reply audio: a reply still
        under way stops there, like a barge-in; a finished one keeps only that much of its text
        in the history. False when the turn is not known here any more."""
        turn = self.turns.get(turn_id)
        if turn is None or not turn.replying:
            return False
        heard = turn.heard_at(audio_ms)
        if turn.active(now_ms_float()):
            await self._publish_to_llm(self._interrupt(turn, "truncated", heard))
        else:
            await self._publish_to_llm(ResponseCancel(turn_id=turn_id, reason="truncated", heard=round(heard, 3), **self.envelope))
        return True

    def _interrupt(self, turn: Turn, reason: str, heard: float | None = None) -> ResponseCancel:
        """Tell the client at once, fence the turn here (not one more audio frame of it is queued),
        and return the cancel for the orchestrator, which stops generation and speech."""
        heard = turn.heard if heard is None else min(heard, turn.heard)
        self.turns.fence(turn.turn_id)
        self.emit("response.interrupted", turn.turn_id, reason=reason)
        stats = self.gateway.stats
        stats.interrupted[reason] = stats.interrupted.get(reason, 0) + 1
        log.info("turn %s interrupted (%s) after %.2f pieces of audio", turn.turn_id, reason, heard)
        return ResponseCancel(turn_id=turn.turn_id, reason=reason, heard=round(heard, 3), **self.envelope)

    async def _publish_to_llm(self, message: BusMessage) -> None:
        try:
            await self.gateway.bus.publish(self.inbox(Stage.LLM), message)
        except (RedisError, OSError) as exc:
            log.warning("could not publish %s: %s", message.type, exc)

    # ---- turns that cannot complete
    def fail_turns_in_flight(self, code: str, message: str, which: Callable[[Turn], bool] | None = None) -> int:
        """End every turn not done yet (those `which` picks, if given) with `error` and
        `response.done`, and fence it (its late output is dropped): its messages may have been
        lost. Returns how many were ended."""
        failed = [turn for turn in self.turns.unfinished() if which is None or which(turn)]
        for turn in failed:
            self.fail_turn(turn.turn_id, code, message)
        return len(failed)

    def fail_turn(self, turn_id: str, code: str, message: str, source: str | None = None) -> None:
        """`error` then an empty `response.done` for a turn that cannot complete; whatever still
        arrives for it is dropped."""
        turn = self.turns.get(turn_id)
        self.turns.fence(turn_id)
        if turn is not None:
            turn.done = True
        log.warning("turn %s ended without its reply: %s", turn_id, code)
        self.emit("error", turn_id, code=code, message=message, source=source)
        self.emit(
            "response.done",
            turn_id,
            text=(turn.text if turn is not None else None) or "",
            metrics=turn.metrics() if turn is not None else {},
            diagnostics=turn.diagnostics() if turn is not None else {},
        )

    # ---- in from the bus
    def deliver(self, message: BusMessage) -> None:
        """Translate one bus message into events (called by the gateway's inbox reader)."""
        if isinstance(message, SessionTakeover):
            if message.connection_id == self.route.connection_id:
                log.info("conversation resumed on another connection; closing this one")
                self._tasks.spawn(self.close(1000, "conversation resumed on another connection"), name="takeover")
            return
        if isinstance(message, ConversationOpened):  # a stage moved to another worker (workers/handoff.py)
            if message.connection_id == self.route.connection_id:
                self.follow(Route.of(message.model_dump()))
                with log_context(self.conversation_id, self.correlation_id):
                    log.info("route now: vad_stt=%s llm=%s tts=%s", message.vad_stt, message.llm, message.tts)
            return
        turn_id = message.turn_id
        if turn_id is not None and self.turns.fenced(turn_id):
            return  # late output of an interrupted reply
        turn = self.turns.open(turn_id) if turn_id is not None else None
        now = now_ms_float()
        match message:
            case SpeechStarted():
                if self.turns.replied_within(now, RESUMED_EARLY_MS, besides=turn_id):
                    self.gateway.metrics.turns_resumed_early.inc()
                self.emit("speech.started", turn_id)
            case SpeechSustained():
                reply = self.turns.current_reply(now, turn_id, message.onset_ms) if self.barge_in else None
                if reply is not None:
                    self._tasks.spawn(self._publish_to_llm(self._interrupt(reply, "barge_in")), name="barge-in")
            case SpeechStopped():
                turn.speech_end_ms, turn.decided_ms = message.speech_end_ms, message.decided_ms
                self.emit("speech.stopped", turn_id)
            case TranscriptPartial():
                self.emit("transcript.partial", turn_id, text=message.text)
            case TranscriptFinal():
                turn.transcript_ms, turn.stt_ms, turn.stt_wait_ms = now, message.stt_ms, message.stt_wait_ms
                self.emit("transcript.final", turn_id, text=message.text)
                if message.text.strip():
                    turn.replying = True
                else:
                    self.turns.drop(turn_id)
            case ResponseTextDelta():
                if turn.first_token_ms is None:
                    turn.first_token_ms = now
                self.emit("response.text.delta", turn_id, delta=message.delta)
            case ResponseTextDone():
                turn.text, turn.pieces = message.text, message.sentences
                turn.llm_ms, turn.llm_first_piece_ms = message.llm_ms, message.first_sentence_ms
                turn.speculative = message.speculative
            case ResponseBlocked():
                turn.blocked = True
                self.emit("response.blocked", turn_id, reason=message.reason)
            case TtsAudioStarted():
                turn.sample_rate, turn.audio_held_ms = message.sample_rate, message.held_ms
                if not turn.blocked:
                    self.emit("response.audio.started", turn_id, sample_rate=message.sample_rate)
            case TtsAudio():
                if turn.blocked:
                    return
                if turn.first_audio_ms is None:
                    turn.first_audio_ms = now
                turn.audio_sent(now, len(message.pcm), message.piece, message.piece_end)
                self.wire.audio(turn_id, message.pcm)
            case TtsAudioDone():
                turn.audio_done = True
                turn.tts_ms, turn.tts_first_chunk_ms = message.tts_ms, message.first_chunk_ms
                if not turn.blocked:
                    self.emit("response.audio.done", turn_id)
            case StageError() if turn is not None and message.code in TURN_ENDING_CODES:
                if not turn.done:  # a worker lost the turn's message to the next stage
                    self.gateway.rerouter.end_turn(self, turn, message.code, message.message, message.source)
                    self._tasks.spawn(self.gateway.rerouter.probe(self), name="probe-route")
            case StageError():
                self.emit("error", turn_id, code=message.code, message=message.message, source=message.source)
            case _:
                log.debug("ignored %s", message.type)
        if turn is not None and turn.complete and not turn.done:
            turn.done = True  # kept (bounded) while its audio may still be playing: barge-in can stop it
            self.gateway.metrics.turn_done(turn.metrics())
            self.emit("response.done", turn_id, text=turn.text, metrics=turn.metrics(), diagnostics=turn.diagnostics())
