"""One client WebSocket (docs/protocol.md §1): a receive loop beside one sender task.

The receive loop turns client frames into bus messages; `deliver` turns bus messages into client
events and queues them for the sender. Whatever way the socket ends, `serve_client`'s `finally`
ends the conversation exactly once, and releases the client's connection slot.

Client input is never trusted: every frame passes the connection's rate limits before anything
else is done with it (gateway/ratelimit.py), text is parsed within limits, and nothing a client
sends ends the socket with 1011; only the server's own failures do. Outbound frames are bounded
in bytes (gateway/outbound.py): a client that stops reading is closed with 1008, a policy
violation on its side (1011 would claim a server fault, and 1013 is the connection limit's code
in PROTOCOL §1.2, telling a client to come back later, which would not help it)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

from gateway import handshake
from gateway.correlation import correlation_id as correlation_id_of
from gateway.hub import Gateway, NotReady, ResumeRefused
from gateway.keepalive import ABORT_AFTER_EXTENSION, KEEPALIVE_TIMEOUT
from gateway.outbound import Outbound
from gateway.ratelimit import RateGuard, Verdict
from gateway.reroute import TURN_ENDING_CODES
from gateway.turns import Turn, TurnTable
from shared.channels import STAGES
from shared.clock import now_ms_float
from shared.logging import log_context
from shared.messages import (
    AudioCommit,
    AudioIn,
    BusMessage,
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
from shared.messages.client import (
    INPUT_AUDIO,
    BadClientMessage,
    InputAudioCommit,
    JsonLimits,
    Ping,
    ResponseCancelRequest,
    TextInputRequest,
    parse_client_message,
    server_event,
)
from shared.tasks import TaskSet

log = logging.getLogger("voicepipe.gateway.session")

SLOW_CLOSE_GRACE_S = 2.0  # a client too slow to read gets this long for the close, then TCP is dropped
CONVERSATION_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # what a resume may name (ours are UUID4s)


class ClientSession:
    def __init__(
        self, gateway: Gateway, websocket: WebSocket, conversation_id: str, route: dict[str, str], resumed: bool = False
    ) -> None:
        self.gateway = gateway
        self.resumed = resumed
        self.websocket = websocket
        self.conversation_id = conversation_id
        self.correlation_id = route["correlation_id"]
        self.route = route
        self.turns = TurnTable()
        self.barge_in = gateway.settings.barge_in_min_speech_ms > 0
        self.shutting_down = False
        self.unavailable: set[str] = set()  # stages with no live worker for this conversation (gateway/reroute.py)
        self.unavailable_told = 0.0  # when the client was last told so about its audio (time.monotonic())
        settings = gateway.settings
        self._outbound = Outbound(settings.max_outbound_bytes)
        self.rate = RateGuard(
            settings.max_messages_per_s,
            settings.audio_realtime_factor,
            settings.rate_limit_close_s,
            max_frame_bytes=settings.max_audio_frame_bytes,
        )
        self.json_limits = JsonLimits.from_settings(settings)
        self._outbound_closing = False  # set once the client is being closed for not reading
        self._tasks = TaskSet(f"session:{conversation_id}")
        self._ended = asyncio.Event()
        self._envelope = {"conversation_id": conversation_id, "correlation_id": self.correlation_id}
        self._told_bus_down = False  # the client was told its audio is dropped while Redis is down
        self.routing_unsure = False  # Redis was lost since the routing was written (gateway/recovery.py)

    # ---- outbound
    def send_event(self, type_: str, turn_id: str | None = None, *, source: str | None = None, **fields: object) -> None:
        """Queue one event for the client; `source`: the worker whose bus message it relays (for metrics)."""
        if type_ == "error":
            self.gateway.metrics.error_sent(str(fields.get("code")), source)
        self._enqueue(server_event(type_, turn_id, **fields))

    def _enqueue(self, frame: str | bytes) -> None:
        if self._outbound.put(frame) or self._outbound_closing:
            return
        self._outbound_closing = True
        self.gateway.stats.closed_slow += 1
        log.warning("client is not reading (over %d bytes queued); closing the connection", self._outbound.max_bytes)
        self._tasks.spawn(self._close_slow(), name="close-slow")

    async def _close_slow(self) -> None:
        """Close a client that does not read. Its close frame may never get through a full TCP
        window, so the connection is dropped after SLOW_CLOSE_GRACE_S in any case."""
        abort_after = self.websocket.scope.get("extensions", {}).get(ABORT_AFTER_EXTENSION)
        if abort_after is not None:
            abort_after(SLOW_CLOSE_GRACE_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SLOW_CLOSE_GRACE_S):
                await self.close(1008, "client too slow: not reading")

    async def _send_loop(self) -> None:
        """Write queued frames until the socket goes away (then the receiver reports why)."""
        to_client = self.gateway.latency.to_client
        while True:
            frame, queued_at = await self._outbound.get()
            try:
                if isinstance(frame, bytes):
                    await self.websocket.send_bytes(frame)
                else:
                    await self.websocket.send_text(frame)
            except (WebSocketDisconnect, ClientDisconnected, RuntimeError, OSError) as exc:
                log.debug("stopped sending: %s", type(exc).__name__)
                return
            to_client.observe((time.perf_counter() - queued_at) * 1000)

    async def close(self, code: int, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.websocket.close(code, handshake.close_reason(reason))

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def fail_turns_in_flight(self, code: str, message: str, which: Callable[[Turn], bool] | None = None) -> int:
        """End every turn not done yet (those `which` picks, if given) with `error` and
        `response.done`, and fence it (its late output is dropped): its messages may have been
        lost. Returns how many were ended."""
        failed = [turn for turn in self.turns.unfinished() if which is None or which(turn)]
        for turn in failed:
            self._fail_turn(turn.turn_id, code, message)
        return len(failed)

    def _fail_turn(self, turn_id: str, code: str, message: str) -> None:
        turn = self.turns.get(turn_id)
        self.turns.fence(turn_id)
        log.warning("turn %s ended without its reply: %s", turn_id, code)
        self.send_event("error", turn_id, code=code, message=message)
        self.send_event(
            "response.done",
            turn_id,
            text=(turn.text if turn is not None else None) or "",
            metrics=turn.metrics() if turn is not None else {},
            diagnostics=turn.diagnostics() if turn is not None else {},
        )

    # ---- the connection
    async def run(self) -> str:
        """Serve the client until the socket ends; returns the disconnect reason."""
        self.send_event(
            "session.started",
            conversation_id=self.conversation_id,
            correlation_id=self.correlation_id,
            resume_token=self.route["resume_token"],
            resumed=self.resumed,
            input_audio=INPUT_AUDIO,
            output_audio={
                "encoding": "pcm_s16le",
                "sample_rate": self.gateway.directory.output_sample_rate() or 22050,
                "channels": 1,
            },
        )
        sender = self._tasks.spawn(self._send_loop(), name="sender")
        lease = asyncio.create_task(self._lease_loop(), name=f"session:{self.conversation_id}:lease")
        receiver = self._tasks.spawn(self._receive_loop(), name="receiver")
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():  # the socket broke under the sender: the receiver will say how
                await asyncio.wait({receiver}, timeout=1.0)
            return receiver.result() if receiver.done() else "client_disconnect"
        finally:
            self._ended.set()
            await self._tasks.aclose()
            await lease  # stops by itself: never cancelled inside a Redis call

    async def _lease_loop(self) -> None:
        """Refresh the routing lease until the socket ends."""
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

    async def _receive_loop(self) -> str:
        limit = self.gateway.settings.max_audio_frame_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1005)
                if message.get("reason") == KEEPALIVE_TIMEOUT:
                    log.info("client stopped answering pings")
                    return "timeout"
                log.info("client socket closed with code %s", code)
                return "client_disconnect"
            data = message.get("bytes")
            if data is not None:
                if len(data) > limit:
                    await self.close(1009, "audio frame larger than 64 KiB")
                    return "client_disconnect"
                verdict = self.rate.audio(len(data))
                if verdict is Verdict.PASS:
                    await self._on_audio(data)
                elif await self._rate_limited(verdict, "audio"):
                    return "client_disconnect"
            elif (text := message.get("text")) is not None:
                if len(text) > limit:
                    await self.close(1009, "message larger than 64 KiB")
                    return "client_disconnect"
                verdict = self.rate.text()
                if verdict is Verdict.PASS:
                    await self._on_text(text)
                elif await self._rate_limited(verdict, "text"):
                    return "client_disconnect"

    async def _rate_limited(self, verdict: Verdict, kind: str) -> bool:
        """A frame over the rate was dropped; True when the client has been closed for it."""
        stats = self.gateway.stats
        stats.rate_limited_frames[kind] = stats.rate_limited_frames.get(kind, 0) + 1
        settings = self.gateway.settings
        if verdict is Verdict.CLOSE:
            stats.closed_rate_limited += 1
            log.warning("client over its %s rate for %.1f s; closing the connection", kind, settings.rate_limit_close_s)
            await self.close(1008, "rate limit exceeded")
            return True
        if verdict is Verdict.NOTIFY:
            if kind == "text":
                why = f"more than {settings.max_messages_per_s} messages a second; the excess is dropped"
            else:
                why = f"audio faster than {settings.audio_realtime_factor:g}x real time; the excess is dropped"
            self.send_event("error", code="rate_limited", message=why)
        return False

    async def _on_audio(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            self.send_event("error", code="bad_audio", message=f"audio frame of {len(pcm)} bytes is not whole 16-bit samples")
            return
        if not self.gateway.bus_health.up:  # dropped, and the client told once per outage
            if not self._told_bus_down:
                self._told_bus_down = True
                self.send_event("error", code="bus_unavailable", message="the message bus is down; audio is dropped until it is back")
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
            inbox = self.gateway.names.inbox("vad_stt", self.route["vad_stt"])
            self.gateway.uplink.send(inbox, self.gateway.bus.encode(AudioIn(received_ms=now_ms_float(), pcm=pcm, **self._envelope)))

    async def _on_text(self, text: str) -> None:
        try:
            request = parse_client_message(text, self.json_limits)
        except BadClientMessage as exc:
            self.send_event("error", code="bad_message", message=str(exc))
            return
        names, bus = self.gateway.names, self.gateway.bus
        if isinstance(request, Ping):
            self.send_event("pong")
        elif isinstance(request, InputAudioCommit) and self.unavailable:
            self.gateway.rerouter.refuse_audio(self)
        elif isinstance(request, InputAudioCommit):  # behind the socket's audio, on the same uplink
            commit = AudioCommit(received_ms=now_ms_float(), **self._envelope)
            self.gateway.uplink.send(names.inbox("vad_stt", self.route["vad_stt"]), bus.encode(commit))
        elif isinstance(request, TextInputRequest):
            # Redis was lost since the routing was written, or is just back: let the bus settle first
            settling = self.routing_unsure or not self.gateway.inbox_live or self.gateway.recovery.settling()
            if settling:
                await self.gateway.recovery.settle(self)
            turn_id = uuid.uuid4().hex[:16]
            now = now_ms_float()
            # a typed turn over a reply under way interrupts it, like speech (unless barge-in is off:
            # then it waits for that reply); the cancel reaches the orchestrator first
            reply = self.turns.current_reply(now) if self.barge_in else None
            turn = self.turns.open(turn_id, typed=True, transcript_ms=now, replying=True)
            if self.unavailable:
                self.gateway.rerouter.refuse_turn(self, turn)
                return
            inbox = names.inbox("llm", self.route["llm"])
            text_input = TextInput(turn_id=turn_id, text=request.text, **self._envelope)
            try:
                if self.routing_unsure:  # the orchestrator drops a turn of a conversation it finds no routing for
                    await self.gateway.recovery.reestablish([self])
                if reply is not None:
                    receivers = (await bus.publish_many([(inbox, self._interrupt(reply, "barge_in")), (inbox, text_input)]))[-1]
                elif settling:  # the orchestrator may still be subscribing again
                    await self.gateway.recovery.publish_when_heard(inbox, text_input)
                    turn.opened_ms = now_ms_float()  # it was heard from now on
                    receivers = 1
                else:
                    receivers = await bus.publish(inbox, text_input)
            except (RedisError, OSError) as exc:
                log.warning("could not publish the typed turn: %s", exc)
                self._fail_turn(turn_id, "bus_unavailable", "the message bus is down; try again in a moment")
                return
            if not receivers:  # the orchestrator is gone: the turn ends now, not in silence
                await self.gateway.rerouter.unreached(self, "llm", turn)
        elif isinstance(request, ResponseCancelRequest):
            reply = self.turns.current_reply(now_ms_float())
            if reply is not None:
                await self._publish_to_llm(self._interrupt(reply, "cancelled"))

    def _interrupt(self, turn: Turn, reason: str) -> ResponseCancel:
        """Tell the client at once, fence the turn here (not one more audio frame of it is queued),
        and return the cancel for the orchestrator, which stops generation and speech."""
        self.turns.fence(turn.turn_id)
        self.send_event("response.interrupted", turn.turn_id, reason=reason)
        self.gateway.stats.interrupted[reason] = self.gateway.stats.interrupted.get(reason, 0) + 1
        log.info("turn %s interrupted (%s) after %.2f pieces of audio", turn.turn_id, reason, turn.heard)
        return ResponseCancel(turn_id=turn.turn_id, reason=reason, heard=round(turn.heard, 3), **self._envelope)

    async def _publish_to_llm(self, message: BusMessage) -> None:
        try:
            await self.gateway.bus.publish(self.gateway.names.inbox("llm", self.route["llm"]), message)
        except (RedisError, OSError) as exc:
            log.warning("could not publish %s: %s", message.type, exc)

    # ---- inbound from the bus
    def deliver(self, message: BusMessage) -> None:
        """Translate one bus message into client events (called by the gateway's inbox reader)."""
        if isinstance(message, SessionTakeover):
            if message.connection_id == self.route["connection_id"]:
                log.info("conversation resumed on another connection; closing this one")
                self._tasks.spawn(self.close(1000, "conversation resumed on another connection"), name="takeover")
            return
        if isinstance(message, ConversationOpened):  # a stage moved to another worker (workers/handoff.py)
            if message.connection_id == self.route["connection_id"]:
                self.route.update({stage: getattr(message, stage) for stage in STAGES})
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
                self.send_event("speech.started", turn_id)
            case SpeechSustained():
                reply = self.turns.current_reply(now, turn_id, message.onset_ms) if self.barge_in else None
                if reply is not None:
                    self._tasks.spawn(self._publish_to_llm(self._interrupt(reply, "barge_in")), name="barge-in")
            case SpeechStopped():
                turn.speech_end_ms, turn.decided_ms = message.speech_end_ms, message.decided_ms
                self.send_event("speech.stopped", turn_id)
            case TranscriptPartial():
                self.send_event("transcript.partial", turn_id, text=message.text)
            case TranscriptFinal():
                turn.transcript_ms, turn.stt_ms, turn.stt_wait_ms = now, message.stt_ms, message.stt_wait_ms
                self.send_event("transcript.final", turn_id, text=message.text)
                if message.text.strip():
                    turn.replying = True
                else:
                    self.turns.drop(turn_id)
            case ResponseTextDelta():
                if turn.first_token_ms is None:
                    turn.first_token_ms = now
                self.send_event("response.text.delta", turn_id, delta=message.delta)
            case ResponseTextDone():
                turn.text, turn.pieces = message.text, message.sentences
                turn.llm_ms, turn.llm_first_piece_ms = message.llm_ms, message.first_sentence_ms
            case ResponseBlocked():
                turn.blocked = True
                self.send_event("response.blocked", turn_id, reason=message.reason)
            case TtsAudioStarted():
                turn.sample_rate = message.sample_rate
                if not turn.blocked:
                    self.send_event("response.audio.started", turn_id, sample_rate=message.sample_rate)
            case TtsAudio():
                if turn.blocked:
                    return
                if turn.first_audio_ms is None:
                    turn.first_audio_ms = now
                turn.audio_sent(now, len(message.pcm), message.piece, message.piece_end)
                self._enqueue(message.pcm)
            case TtsAudioDone():
                turn.audio_done = True
                turn.tts_ms, turn.tts_first_chunk_ms = message.tts_ms, message.first_chunk_ms
                if not turn.blocked:
                    self.send_event("response.audio.done", turn_id)
            case StageError() if turn is not None and message.code in TURN_ENDING_CODES:
                if not turn.done:  # a worker lost the turn's message to the next stage
                    self.gateway.rerouter.end_turn(self, turn, message.code, message.message, message.source)
                    self._tasks.spawn(self.gateway.rerouter.probe(self), name="probe-route")
            case StageError():
                self.send_event("error", turn_id, code=message.code, message=message.message, source=message.source)
            case _:
                log.debug("ignored %s", message.type)
        if turn is not None and turn.complete and not turn.done:
            turn.done = True  # kept (bounded) while its audio may still be playing: barge-in can stop it
            self.gateway.metrics.turn_done(turn.metrics())
            self.send_event(
                "response.done", turn_id, text=turn.text, metrics=turn.metrics(), diagnostics=turn.diagnostics()
            )


async def serve_client(gateway: Gateway, websocket: WebSocket) -> None:
    """The whole life of one client connection."""
    correlation_id = correlation_id_of(websocket.scope["headers"])
    with log_context(correlation_id=correlation_id):
        try:
            admission = await handshake.admit(gateway, websocket, correlation_id)
        except (ClientDisconnected, WebSocketDisconnect, OSError):
            return  # the client left during its own refusal
        if admission is None:
            return
        try:
            await _serve_admitted(gateway, websocket, correlation_id, admission)
        finally:
            if admission.slot is not None:
                await asyncio.shield(gateway.limits.release(admission.slot))


async def _serve_admitted(
    gateway: Gateway, websocket: WebSocket, correlation_id: str, admission: handshake.Admission
) -> None:
    try:
        await websocket.accept(subprotocol=admission.subprotocol)
    except (ClientDisconnected, WebSocketDisconnect, OSError):
        return
    params = websocket.query_params
    conversation_id, token = params.get("conversation_id"), params.get("resume_token")
    new_token = None
    if conversation_id or token:
        try:
            if not (conversation_id and token):
                raise ResumeRefused("resuming needs both conversation_id and resume_token")
            if not CONVERSATION_ID.fullmatch(conversation_id):
                raise ResumeRefused("unknown or expired conversation_id and resume_token")
            await gateway.ensure_ready()  # first: a resume that cannot be served keeps its token
            new_token = await gateway.resume(conversation_id, token)
        except ResumeRefused as exc:
            log.info("resume refused: %s", exc)
            await _refuse(gateway, websocket, "unknown_conversation", str(exc), 4404, "unknown or expired conversation")
            return
        except NotReady as exc:  # nothing was opened or claimed: no disconnect event to publish
            log.warning("refusing the resume: %s", exc)
            await _refuse(gateway, websocket, "not_ready", str(exc), 1011, "pipeline not ready")
            return
        except (RedisError, OSError) as exc:
            log.warning("resume failed: %s", exc)
            await _refuse(gateway, websocket, "bus_unavailable", "the server cannot resume conversations now", 1011, "bus unavailable")
            return
    conversation_id = conversation_id or str(uuid.uuid4())
    with log_context(conversation_id=conversation_id):
        await _serve_conversation(gateway, websocket, conversation_id, correlation_id, new_token)


async def _refuse(
    gateway: Gateway, websocket: WebSocket, code: str, message: str, close_code: int, close_reason: str
) -> None:
    gateway.metrics.error_sent(code)
    with contextlib.suppress(Exception):
        await websocket.send_text(server_event("error", code=code, message=message))
        await websocket.close(close_code, close_reason)


async def _serve_conversation(
    gateway: Gateway, websocket: WebSocket, conversation_id: str, correlation_id: str, resume_token: str | None
) -> None:
    reason, detail, connection_id, session = "client_disconnect", None, None, None
    try:
        route = await gateway.open_conversation(conversation_id, correlation_id, resume_token)
        connection_id = route["connection_id"]
        log.info(
            "conversation %s: vad_stt=%s llm=%s tts=%s",
            "resumed" if resume_token else "opened", route["vad_stt"], route["llm"], route["tts"],
        )
        session = ClientSession(gateway, websocket, conversation_id, route, resumed=resume_token is not None)
        gateway.sessions[conversation_id] = session
        reason = await session.run()
        if session.shutting_down:
            reason, detail = "server_error", "shutdown"
    except NotReady as exc:
        reason = "server_error"
        log.warning("refusing conversation: %s", exc)
        gateway.metrics.error_sent("not_ready")
        with contextlib.suppress(Exception):
            await websocket.send_text(server_event("error", code="not_ready", message=str(exc)))
            await websocket.close(*((1001, "server shutting down") if gateway.closing else (1011, "pipeline not ready")))
    except WebSocketDisconnect:
        reason = "client_disconnect"
    except RedisError as exc:  # Redis went away while the conversation was opened
        reason = "server_error"
        log.warning("conversation failed: Redis is unreachable: %s", exc)
        gateway.metrics.error_sent("bus_unavailable")
        with contextlib.suppress(Exception):
            await websocket.send_text(server_event("error", code="bus_unavailable", message="the message bus is down; try again in a moment"))
            await websocket.close(1011, "bus unavailable")
    except asyncio.CancelledError:
        reason, detail = "server_error", "shutdown"
        raise
    except Exception:
        reason = "server_error"
        log.exception("connection failed")
        if session is not None:
            await session.close(1011, "internal error")
    finally:
        try:
            await asyncio.shield(
                gateway.end_conversation(conversation_id, correlation_id, reason, detail, connection_id=connection_id)
            )
        finally:
            # leave the registry only once the event is out: shutdown waits on the registry
            if gateway.sessions.get(conversation_id) is session:
                gateway.sessions.pop(conversation_id, None)
