"""LLM orchestrator: one reply at a time per conversation; text to the gateway, pieces to TTS, history kept.

Between the LLM stream and everything downstream sits the output guard: text leaves only once the
guard has decided it, and a block closes the upstream stream at once. A user turn that arrives while
a reply is generating waits for it (at most `MAX_PENDING_TURNS`); a barge-in or `response.cancel`
reaches the orchestrator as `ResponseCancel` naming its turn, which stops that reply (upstream stream
closed, TTS told) only if it is still the current or a waiting one, and cuts the history's copy of
the reply to what the client was sent audio of.

`ResponseCancel` with reason `truncated` (the client says how much of a reply it played) acts the
same on the current or a waiting reply. On the reply that finished most recently, whose messages
are still the last two of the history, it only cuts the history's copy to what was heard, as a
barge-in does, and tells no one: that reply is over everywhere else. Only that one reply is kept
for it (`ChatConversation.finished`); a truncate of anything older is ignored.

The client may replace the system prompt for its conversation (`conversation.configured`
`instructions`): kept with the conversation's state, never in the history, and sent as the system
message of its next replies. A new owner after a hand-off starts from the setting until the gateway
sends the instructions again, which it does whenever the route changes.

Speculative replies (setting `SPECULATIVE_REPLY`): the VAD/STT worker sends the transcript of a
pause before the end of the turn is decided (`transcript.early`). When nothing else is replying, the
orchestrator starts the reply on it at once, but holds everything it would send the gateway, and the
TTS worker holds the audio (it renders the first piece only) under the speculation's own TTS turn id.
The turn's final transcript decides: the same text confirms it (the held messages go out, TTS is
told to release, the turn goes on as any other and reaches the history); other text, a withdrawal
(the user spoke on), a typed turn or `SPECULATION_MAX_S` without a decision discard it (upstream
stream closed, TTS stopped, nothing sent or written), and the final text is replied to as usual.
At most one speculation per conversation is alive at a time."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from shared.messages import (
    BusMessage,
    ConversationConfigured,
    ResponseBlocked,
    ResponseCancel,
    ResponseTextDelta,
    ResponseTextDone,
    StageError,
    TextInput,
    TranscriptEarly,
    TranscriptFinal,
    TranscriptWithdrawn,
    TtsEnd,
    TtsRelease,
    TtsSpeak,
    TtsStop,
)
from shared.sentences import SentenceSplitter
from shared.stages import GATEWAY, Stage
from shared.tasks import Fence, TaskSet, keep_running, stop_tasks
from workers.llm_orchestrator.guard import Blocked, OutputGuard, term_check
from workers.llm_orchestrator.history import HistoryStore, Message, for_llm, trim
from workers.llm_orchestrator.llm_client import (
    ChatClient,
    LlmFailure,
    LlmTimeout,
    LlmUnavailable,
)
from workers.llm_orchestrator.readiness import LlmReadiness
from workers.llm_orchestrator.slices import scheduled
from workers.runtime import Route, Worker

log = logging.getLogger("voicepipe.llm")

BLOCKED_LOG_LINE = "Connection closed after blocking streaming output"
SPECULATION_MAX_S = 10.0  # a speculative reply whose turn is neither confirmed nor withdrawn by then is discarded


@dataclass
class ReplyTurn:
    """One user turn and the reply to it."""

    turn_id: str | None
    user_text: str
    fence: Fence = field(default_factory=Fence)  # closed when the turn is cancelled
    task: asyncio.Task[None] | None = None
    pieces: list[str] = field(default_factory=list)  # the reply's text as handed to TTS, in order
    generating: bool = False  # the upstream stream is open (or about to be)
    answered: bool = False  # `ResponseTextDone` went to the gateway
    in_history: bool = False  # the reply was written to the history
    cancelled: bool = False
    # a speculative reply: started on an early transcript, held back until the turn is confirmed
    speculative: bool = False  # not confirmed yet: gateway-bound messages wait in `held`
    tts_id: str | None = None  # the id TTS knows the reply by (its own for a speculation)
    tts_inbox: str | None = None  # the TTS worker its pieces went to
    held: list[BusMessage] = field(default_factory=list)
    held_pieces: int = 0  # pieces TTS was sent to hold
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)  # a confirmation never splits a send
    llm_started: float | None = None  # perf_counter() when its LLM stream opened
    llm_s: float | None = None  # how long the stream was open, once closed

    def __post_init__(self) -> None:
        if self.tts_id is None:
            self.tts_id = self.turn_id

    @property
    def started_speculatively(self) -> bool:
        """Started on an early transcript (confirmed since or not): TTS knows it by an id of its own."""
        return self.tts_id != self.turn_id

    def heard_text(self, heard: float) -> str:
        """The reply's text up to `heard` pieces (a partly sent piece contributes its share of words)."""
        whole = min(int(heard), len(self.pieces))
        parts = self.pieces[:whole]
        if whole < len(self.pieces) and heard > whole:
            words = self.pieces[whole].split()
            parts.append(" ".join(words[: round(len(words) * (heard - whole))]))
        return " ".join(p for p in parts if p)

    def as_heard(self, heard: float) -> list[Message]:
        """The turn as the history keeps a reply the client heard only `heard` pieces of (a
        barge-in, a cancel, a truncation): its text up to there, marked interrupted."""
        return [
            {"role": "user", "content": self.user_text},
            {"role": "assistant", "content": self.heard_text(heard), "note": "interrupted"},
        ]


class ChatConversation:
    """What the orchestrator holds for one conversation: the current turn and the turns waiting."""

    def __init__(self, conversation_id: str, route: Route, history: list[Message]) -> None:
        self.conversation_id = conversation_id
        self.route = route
        self.history = history  # as stored (trimmed); written through to Redis after each reply
        self.tasks = TaskSet(f"llm:{conversation_id}")
        self.fence = Fence()
        self.current: ReplyTurn | None = None  # the latest turn replied to (its audio may still play)
        self.finished: ReplyTurn | None = None  # the turn whose messages are the last two of `history`
        self.pending: deque[ReplyTurn] = deque()
        self.speculation: ReplyTurn | None = None  # a reply started on an early transcript, not confirmed yet
        self.instructions: str | None = None  # the client's system prompt (None: the setting)
        self.upstream_streams = 0  # open HTTP streams to the LLM server
        # one write to the stored history at a time, in the order made: a truncate of the last reply
        # may come while the next reply is written (each write reads, changes and stores the list)
        self.writing = asyncio.Lock()

    @property
    def replying(self) -> bool:
        return self.current is not None and self.current.generating


class LlmWorker(Worker):
    stage = Stage.LLM

    def __init__(self, settings, client, chat: ChatClient | None = None) -> None:
        super().__init__(settings, client)
        self.chat = chat
        self.guard_check = term_check(settings.guard_blocked_terms)
        self.conversations: dict[str, ChatConversation] = {}
        self.llm_readiness: LlmReadiness | None = None  # set in load(), once the client exists
        self.speculations = {"started": 0, "confirmed": 0, "wasted": 0}  # speculative replies (`/metrics`)
        self.speculation_wasted_s = 0.0  # LLM stream time of the discarded ones
        self._own = TaskSet("llm-orchestrator")
        self.history = HistoryStore(
            client,
            self.names,
            ttl_s=settings.resume_window_s,
            max_messages=settings.history_max_messages,
            max_chars=settings.history_max_chars,
        )

    async def load(self) -> None:
        if self.chat is None and self.settings.null_mode:
            from workers.null import NullChat

            self.chat = NullChat(self.settings.null_compute_ms / 1000)
        if self.chat is None:
            s = self.settings
            if not s.llm_base_url:
                raise SystemExit("VOICEPIPE_LLM_BASE_URL is not set (voicepipe up starts an embedded LLM for you)")
            self.chat = scheduled(ChatClient.from_settings(s), s)
        self.llm_readiness = LlmReadiness(
            self.chat.check,
            self.settings.llm_check_interval_s,
            busy_grace_s=self.settings.llm_read_timeout_s,
            streaming=lambda: self.chat.open_streams,
        )
        await self.llm_readiness.check_now()  # the first heartbeat already says whether the LLM answers
        self._own.spawn(keep_running("llm-check", self.llm_readiness.run, self.loop_restarts), name="llm-check")

    def heartbeat_info(self) -> dict[str, object]:
        return {"llm_ok": self.llm_readiness.ok} if self.llm_readiness is not None else {}

    async def aclose(self) -> None:
        await self._own.aclose()
        await super().aclose()
        if self.chat is not None:
            await self.chat.aclose()

    def pools(self) -> dict[str, dict[str, int]]:
        pools = super().pools()
        if self.chat is not None:
            pools["llm_http"] = self.chat.pool_stats()
        return pools

    def conversation_ids(self) -> list[str]:
        return list(self.conversations)

    def holds(self, conversation_id: str) -> dict[str, int]:
        conv = self.conversations.get(conversation_id)
        return {
            "conversation": int(conv is not None),
            "generation_tasks": int(conv.replying) + int(conv.speculation is not None) if conv else 0,
            "pending_turns": len(conv.pending) if conv else 0,
            "upstream_streams": conv.upstream_streams if conv else 0,
        }

    def resources(self) -> dict[str, int]:
        convs = self.conversations.values()
        return {
            "conversations": len(self.conversations),
            "generation_tasks": sum(int(c.replying) + int(c.speculation is not None) for c in convs),
            "pending_turns": sum(len(c.pending) for c in convs),
            "upstream_streams": sum(c.upstream_streams for c in convs),
        }

    def busy(self, conversation_id: str) -> bool:
        conv = self.conversations.get(conversation_id)
        return conv is not None and bool(conv.pending or len(conv.tasks))  # a reply, or its history write

    async def cut(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        conv.pending.clear()  # their user turns were never answered: the client re-asks on the new owner
        await self._discard(conv, "the orchestrator shuts down")
        turn = conv.current
        if turn is not None and turn.generating and not turn.answered:
            turn.fence.close()
            await stop_tasks([turn.task] if turn.task else [])
            await self.bus.publish(self.names.tts_control, TtsStop(**self._tts_envelope(conv, turn)))
            await self._fail_turn(conv, turn, "stage_failed", "the orchestrator serving this turn shut down")

    async def release(self, conversation_id: str) -> None:
        """Handed off: its history is written already, and TTS must go on speaking for it."""
        conv = self.conversations.pop(conversation_id, None)
        if conv is not None:
            await self._discard(conv, "handed off")  # the new owner replies to the final transcript
            conv.fence.close()
            await conv.tasks.aclose()

    async def close_conversation(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        conv.fence.close()
        conv.pending.clear()
        try:
            await conv.tasks.aclose()  # closes the upstream LLM stream at once
            stop = TtsStop(
                conversation_id=conversation_id,
                correlation_id=conv.route.correlation_id,
                connection_id=conv.route.connection_id,
            )
            await self.bus.publish(self.names.tts_control, stop)
            await self.history.keep_for_resume(conversation_id)
        finally:
            self.conversations.pop(conversation_id, None)

    def follow_route(self, conversation_id: str, route: Route) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            conv.route = route

    async def prepare(self, conversation_id: str, route: Route) -> None:
        if conversation_id not in self.conversations:  # the history is read now, not on the first turn
            history = await self.history.load(conversation_id)
            self.conversations[conversation_id] = ChatConversation(conversation_id, route, history)

    async def _admitted(self, message: BusMessage) -> ChatConversation | None:
        """The conversation's state, prepared from its live routing if not held yet (None: the
        message is not for this worker, or the conversation is over)."""
        conv = self.conversations.get(message.conversation_id)
        if conv is None and await self.admit(message):
            conv = self.conversations[message.conversation_id]
        return conv

    async def handle(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, (TranscriptFinal, TextInput)):
            conv = await self._admitted(message)
            if conv is not None and message.text.strip() and not await self._decide_speculation(conv, message):
                await self._queue(conv, ReplyTurn(message.turn_id, message.text))
        elif isinstance(message, TranscriptEarly):
            conv = await self._admitted(message)
            if conv is not None:
                await self._speculate(conv, message)
        elif isinstance(message, TranscriptWithdrawn):
            conv = self.conversations.get(message.conversation_id)
            if conv is not None and conv.speculation is not None and conv.speculation.turn_id == message.turn_id:
                await self._discard(conv, "the user went on speaking")
        elif isinstance(message, ResponseCancel):
            conv = self.conversations.get(message.conversation_id)
            if conv is None:
                return
            if message.reason == "truncated" and not self._replying_to(conv, message.turn_id):
                await self._truncate(conv, message)
            else:
                await self._cancel(conv, message)
        elif isinstance(message, ConversationConfigured):
            conv = await self._admitted(message)
            if conv is not None:
                conv.instructions = message.instructions  # turn detection is the VAD's business
        else:
            log.warning("unexpected %s on %s", message.type, channel)

    # ---- turns
    async def _queue(self, conv: ChatConversation, turn: ReplyTurn) -> None:
        """Reply now, or after the reply under way (which only a cancel or a barge-in stops)."""
        if len(conv.pending) >= self.settings.max_pending_turns:
            log.warning("turn %s refused: %d turns already wait for the reply under way", turn.turn_id, len(conv.pending))
            await self._fail_turn(conv, turn, "rate_limited", "too many turns are waiting for the reply under way")
            return
        conv.pending.append(turn)
        self._start_next(conv)

    def _start_next(self, conv: ChatConversation) -> None:
        if conv.fence.closed or conv.replying or not conv.pending:
            return
        turn = conv.current = conv.pending.popleft()
        turn.generating = True
        turn.task = conv.tasks.spawn(self._reply(conv, turn), name=f"reply:{turn.turn_id}")

    # ---- speculative replies
    async def _speculate(self, conv: ChatConversation, early: TranscriptEarly) -> None:
        """Start the reply on an early transcript, held back, when nothing else is replying."""
        await self._discard(conv, "a newer early transcript")  # at most one per conversation
        if not self.settings.speculative_reply or conv.fence.closed or conv.replying or conv.pending or not early.text.strip():
            return
        turn = ReplyTurn(early.turn_id, early.text, speculative=True, tts_id=uuid.uuid4().hex[:16])
        conv.speculation = turn
        turn.generating = True
        turn.task = conv.tasks.spawn(self._reply(conv, turn), name=f"speculation:{turn.turn_id}")
        self.speculations["started"] += 1
        log.debug("speculative reply for turn %s started", turn.turn_id)

    async def _decide_speculation(self, conv: ChatConversation, message: TranscriptFinal | TextInput) -> bool:
        """A user turn arrived: it confirms the speculation (the same turn, the same text; True) or
        discards it (False: the turn is queued as usual)."""
        turn = conv.speculation
        if turn is None:
            return False
        if not (isinstance(message, TranscriptFinal) and message.turn_id == turn.turn_id and message.text == turn.user_text):
            await self._discard(conv, "the final transcript differs")
            return False
        async with turn.sending:  # between two sends of the reply: nothing is sent held from now on
            turn.speculative = False
            conv.speculation = None
            conv.current = turn
            out: list[tuple[str, BusMessage]] = [(conv.route.inbox(GATEWAY, self.names), m) for m in turn.held]
            turn.held = []
            if turn.held_pieces:  # after its pieces on the same inbox, so TTS knows them all
                out.append((turn.tts_inbox, TtsRelease(**self._tts_envelope(conv, turn))))
            if out:
                await self.bus.publish_many(out)
        turn.confirmed.set()
        self.speculations["confirmed"] += 1
        log.debug("speculative reply for turn %s confirmed", turn.turn_id)
        return True

    async def _discard(self, conv: ChatConversation, why: str) -> None:
        """Discard the conversation's speculation, if any: its stream closed, its held audio dropped
        at TTS, nothing sent or written."""
        turn = conv.speculation
        if turn is None or not self._let_go(conv, turn):
            return
        if turn.task is not None:
            await stop_tasks([turn.task])
        await self._forget(conv, turn, why)

    @staticmethod
    def _let_go(conv: ChatConversation, turn: ReplyTurn) -> bool:
        """Make `turn` no longer the conversation's speculation, and end it (nothing more of it is
        sent); False when it was not the speculation any more (confirmed or discarded already)."""
        if conv.speculation is not turn:
            return False
        conv.speculation = None
        turn.cancelled = True
        turn.fence.close()
        return True

    async def _forget(self, conv: ChatConversation, turn: ReplyTurn, why: str) -> None:
        self.speculations["wasted"] += 1
        llm_s = turn.llm_s if turn.llm_s is not None else time.perf_counter() - (turn.llm_started or time.perf_counter())
        self.speculation_wasted_s += llm_s
        if turn.held_pieces:
            with contextlib.suppress(RedisError, OSError):  # a TTS that never hears it drops the speculation at its next turn
                await self.bus.publish(self.names.tts_control, TtsStop(**self._tts_envelope(conv, turn)))
        log.debug("speculative reply for turn %s discarded (%s)", turn.turn_id, why)

    async def _cancel(self, conv: ChatConversation, message: ResponseCancel) -> None:
        """Stop the reply of `message.turn_id` if it is current or waiting; ignore it otherwise."""
        waiting = next((t for t in conv.pending if t.turn_id == message.turn_id), None)
        if waiting is not None:
            conv.pending.remove(waiting)
            log.info("waiting turn %s cancelled (%s)", message.turn_id, message.reason)
            return
        turn = conv.current
        if turn is None or turn.turn_id != message.turn_id or turn.cancelled:
            log.debug("ignored a cancel for turn %s: not the current reply", message.turn_id)
            return
        turn.cancelled = True
        turn.fence.close()
        if turn.task is not None:
            if turn.generating:
                await stop_tasks([turn.task])  # leaves the stream: the upstream response is closed now
            else:  # finishing up (last publish, history write): the fence ends it at its next publish
                await asyncio.wait([turn.task], timeout=5)
        await self.bus.publish(self.names.tts_control, TtsStop(**self._tts_envelope(conv, turn)))
        log.info("reply for turn %s stopped (%s); %.2f of %d pieces sent", turn.turn_id, message.reason, message.heard, len(turn.pieces))
        await self._remember(conv, turn.as_heard(message.heard), turn, replace_last=2 if turn.in_history else 0)
        self._start_next(conv)

    @staticmethod
    def _replying_to(conv: ChatConversation, turn_id: str | None) -> bool:
        """Whether `turn_id` is the current reply (not already stopped) or a waiting one."""
        current = conv.current
        if current is not None and current.turn_id == turn_id and not current.cancelled:
            return True
        return any(t.turn_id == turn_id for t in conv.pending)

    async def _truncate(self, conv: ChatConversation, message: ResponseCancel) -> None:
        """Cut the history's copy of the reply that finished most recently to the `heard` pieces the
        client played. Nothing is published: that reply is over everywhere else."""
        turn = conv.finished
        history = conv.history
        if (
            turn is None
            or turn.turn_id != message.turn_id
            or len(history) < 2
            or [m.get("role") for m in history[-2:]] != ["user", "assistant"]
        ):
            log.debug("ignored a truncate for turn %s: not the last reply", message.turn_id)
            return
        log.info("reply for turn %s truncated: %.2f of %d pieces heard", turn.turn_id, message.heard, len(turn.pieces))
        await self._remember(conv, turn.as_heard(message.heard), turn, replace_last=2)

    async def _remember(
        self, conv: ChatConversation, messages: list[Message], turn: ReplyTurn, replace_last: int = 0
    ) -> None:
        """Write `turn`'s user and assistant messages at the end of the history (replacing the last
        `replace_last`), and remember the turn as the one a truncate can still cut."""
        s = self.settings
        kept = conv.history[: len(conv.history) - replace_last] if replace_last else conv.history
        conv.history = trim(kept + messages, s.history_max_messages, s.history_max_chars)
        conv.finished = turn
        async with conv.writing:
            await self.history.append(conv.conversation_id, *messages, replace_last=replace_last)

    async def _fail_turn(self, conv: ChatConversation, turn: ReplyTurn, code: str, message: str) -> None:
        """End a turn that gets no reply: `error` then an empty `ResponseTextDone`, so the client's
        turn ends with `response.done` instead of waiting."""
        envelope = self._envelope(conv, turn)
        gateway = conv.route.inbox(GATEWAY, self.names)
        error = StageError(code=code, message=message, **envelope)
        await self.bus.publish_many([(gateway, error), (gateway, ResponseTextDone(text="", sentences=0, **envelope))])

    @staticmethod
    def _envelope(conv: ChatConversation, turn: ReplyTurn) -> dict[str, str | None]:
        return {"conversation_id": conv.conversation_id, "correlation_id": conv.route.correlation_id, "turn_id": turn.turn_id}

    @classmethod
    def _tts_envelope(cls, conv: ChatConversation, turn: ReplyTurn) -> dict[str, str | None]:
        """The envelope of what goes to TTS: the reply under the id TTS knows it by."""
        return {**cls._envelope(conv, turn), "turn_id": turn.tts_id}

    async def _reply(self, conv: ChatConversation, turn: ReplyTurn) -> None:
        try:
            try:
                await self._generate(conv, turn)
            except Exception:
                if not turn.speculative:
                    raise
                log.debug("speculative reply for turn %s failed", turn.turn_id, exc_info=True)
                if self._let_go(conv, turn):  # the final transcript gets a reply of its own
                    await self._forget(conv, turn, "it failed")
        except RedisError as exc:  # past the command retries; a gateway that lost Redis too ended the turn itself
            log.warning("reply for turn %s lost: Redis is unreachable (%s)", turn.turn_id, exc)
            if not turn.answered and not turn.fence.closed and not conv.fence.closed:
                with contextlib.suppress(Exception):
                    await self._fail_turn(conv, turn, "bus_unavailable", "the message bus was interrupted")
        except Exception:
            log.exception("reply for turn %s failed", turn.turn_id)
            if not turn.answered and not turn.fence.closed and not conv.fence.closed:
                with contextlib.suppress(Exception):  # best effort: the client must not wait forever
                    await self._fail_turn(conv, turn, "llm_error", "the reply failed")
        finally:
            turn.generating = False
            if not turn.cancelled:
                self._start_next(conv)

    async def _generate(self, conv: ChatConversation, turn: ReplyTurn) -> None:
        envelope = self._envelope(conv, turn)
        tts_envelope = self._tts_envelope(conv, turn)
        gateway = conv.route.inbox(GATEWAY, self.names)
        user: Message = {"role": "user", "content": turn.user_text}
        system = self.settings.system_prompt if conv.instructions is None else conv.instructions
        messages = [{"role": "system", "content": system}, *for_llm(conv.history), user]
        splitter = SentenceSplitter(self.settings.first_clause_min_words, self.settings.first_piece_max_words)
        guard = OutputGuard(self.guard_check)
        released: list[str] = []
        first_sentence_ms: float | None = None
        failure: LlmFailure | None = None
        blocked: Blocked | None = None
        started = time.perf_counter()
        tts_lost = False

        async def send(*items: tuple[str, BusMessage]) -> None:
            """Publish (several in one round trip) unless this turn or the conversation has ended;
            checked on both sides of the await. While the reply is speculative, what goes to the
            gateway is held and TTS is told to hold the audio."""
            nonlocal tts_lost
            turn.fence.guard()
            conv.fence.guard()
            async with turn.sending:
                turn.fence.guard()
                if turn.speculative:
                    turn.held += [message for channel, message in items if channel == gateway]
                    items = tuple(item for item in items if item[0] != gateway)
                for _, message in items:
                    if isinstance(message, TtsSpeak) and turn.speculative:
                        message.held = True
                        turn.held_pieces += 1
                reached = await self.bus.publish_many(items) if items else []
                if not tts_lost and any(not n for (channel, _), n in zip(items, reached) if channel == turn.tts_inbox):
                    tts_lost = True  # the TTS worker is gone: the gateway ends the turn and re-routes
                    lost = StageError(code="stage_failed", message="the tts worker serving this turn stopped", **envelope)
                    if turn.speculative:
                        turn.held.append(lost)
                    else:
                        await self.bus.publish(gateway, lost)
            turn.fence.guard()

        def to_tts(pieces: list[str]) -> list[tuple[str, BusMessage]]:
            nonlocal first_sentence_ms
            if pieces and turn.tts_inbox is None:  # read at the first piece: a TTS hand-off before it is followed at once
                turn.tts_inbox = conv.route.inbox(Stage.TTS, self.names)
            if pieces and first_sentence_ms is None:
                first_sentence_ms = round((time.perf_counter() - started) * 1000, 1)
            first_seq = len(turn.pieces)
            turn.pieces.extend(pieces)
            reply_to = turn.turn_id if turn.started_speculatively else None  # a speculation's pieces answer the user's turn
            return [
                (turn.tts_inbox, TtsSpeak(text=piece, seq=first_seq + i, reply_to=reply_to, **tts_envelope))
                for i, piece in enumerate(pieces)
            ]

        async def release(text: str) -> None:
            """Text the guard let through: finished pieces to TTS first, in one round trip with the delta."""
            if text:
                released.append(text)
                await send(*to_tts(splitter.feed(text)), (gateway, ResponseTextDelta(delta=text, **envelope)))

        conv.upstream_streams += 1
        turn.llm_started = started
        try:
            # a speculation ranks below every confirmed reply where the LLM is scheduled (slices.py)
            async with contextlib.aclosing(self.chat.stream_chat(messages, confirmed=turn.confirmed if turn.speculative else None)) as stream:
                async for delta in stream:
                    try:
                        text = guard.feed(delta)
                    except Blocked as exc:
                        blocked = exc
                        break  # leaving the block closes the upstream response
                    await release(text)
            if blocked is None:
                try:
                    await release(guard.finish())
                except Blocked as exc:
                    blocked = exc
        except LlmFailure as exc:
            failure = exc
            if isinstance(exc, (LlmUnavailable, LlmTimeout)) and self.llm_readiness is not None:
                self.llm_readiness.failed()
        else:
            if blocked is None and self.llm_readiness is not None:
                self.llm_readiness.answered()
        finally:
            conv.upstream_streams -= 1
            turn.generating = False
            turn.llm_s = time.perf_counter() - started
        llm_ms = round(turn.llm_s * 1000, 1)
        closing: list[tuple[str, BusMessage]] = []
        if blocked is not None:
            log.info(BLOCKED_LOG_LINE)
            closing += [(self.names.tts_control, TtsStop(**tts_envelope)), (gateway, ResponseBlocked(reason=blocked.reason, **envelope))]
        else:
            if failure is not None:
                log.warning("LLM failed (%s): %s", failure.code, failure)
                closing.append((gateway, StageError(code=failure.code, message=str(failure), **envelope)))
            rest = splitter.flush()
            closing += to_tts([rest] if rest is not None else [])
            if turn.pieces:
                closing.append((turn.tts_inbox, TtsEnd(sentences=len(turn.pieces), **tts_envelope)))
        text = "".join(released).strip()
        done = ResponseTextDone(
            text=text,
            sentences=len(turn.pieces),
            llm_ms=llm_ms,
            first_sentence_ms=first_sentence_ms,
            speculative=turn.started_speculatively,
            **envelope,
        )
        await send(*closing, (gateway, done))
        turn.answered = True
        if turn.speculative and not await self._confirmed(conv, turn):
            return
        log.info("reply of %d pieces in %.0f ms (first piece at %s ms)", len(turn.pieces), llm_ms, first_sentence_ms)
        if blocked is not None or (failure is None and text):
            turn.fence.guard()
            reply: Message = {"role": "assistant", "content": text}
            if blocked is not None:
                reply["note"] = "blocked"
            turn.in_history = True
            await self._remember(conv, [user, reply], turn)

    async def _confirmed(self, conv: ChatConversation, turn: ReplyTurn) -> bool:
        """A speculative reply generated to its end waits for its turn to be decided; one that is
        not within `SPECULATION_MAX_S` (its worker lost the turn) is discarded from here."""
        try:
            await asyncio.wait_for(turn.confirmed.wait(), SPECULATION_MAX_S)
            return True
        except TimeoutError:
            if self._let_go(conv, turn):
                await self._forget(conv, turn, f"not confirmed within {SPECULATION_MAX_S:.0f} s")
            return False
