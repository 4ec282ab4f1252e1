"""TTS worker: one ordered speech queue per conversation; audio goes back in small chunks.

The voice is shared between conversations through a fair scheduler (shared/fair.py): each
conversation's speaker hands it one piece at a time, and the conversations are served round-robin,
so a long reply (or many) of one conversation never makes another's first piece wait behind it.

While it speaks for a conversation the key `tts_active` exists (absent means false). A stop names
its turn: the turn's queued pieces are dropped and its synthesis under way is abandoned; the stopped
turn is remembered (a few of the latest only) so a piece of it that was still in flight is dropped too.

A speculative reply (`TtsSpeak.reply_to`, workers/llm_orchestrator/handler.py) is spoken under an
id of its own and sent as the user's turn's. While the turn is not confirmed (`TtsSpeak.held`) its
first piece is rendered at once and its audio held here, and nothing more is rendered until
`TtsRelease` sends the held audio (then the rest as usual), or a `TtsStop` of its id drops it. A held reply never blocks the queue for long: a piece of any other turn
drops it (the orchestrator starts another reply only once the speculation is over), and so does
`SPECULATION_HOLD_MAX_S` without a decision.

A reply's later pieces are paced to its playback: one is rendered only once less than `TTS_LEAD_S`
of the reply's audio is ahead of where its listener is (counted from when its first audio left
here, or its release). The LLM writes a reply far faster than it is spoken, and rendering all of it
at once kept piper busy, and two cores with it, just when other conversations' first pieces,
transcriptions and first tokens needed them; a reply that is interrupted is no longer rendered to
its end for nothing either. A draining worker renders what is left at once."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from shared.fair import FairScheduler, Job
from shared.messages import (
    BusMessage,
    RequestCancel,
    SpeechAudio,
    SpeechDone,
    SpeechRequest,
    StageError,
    TtsAudio,
    TtsAudioDone,
    TtsAudioStarted,
    TtsEnd,
    TtsRelease,
    TtsSpeak,
    TtsStop,
)
from shared.recent import RecentIds
from shared.sentences import SentenceSplitter
from shared.stages import GATEWAY, Stage
from shared.tasks import Fence, TaskSet, stop_tasks
from workers.requests import OneShotRequests
from workers.runtime import Route, Worker
from workers.tts.voice import Voice

log = logging.getLogger("voicepipe.tts")

STOPPED_TURNS_KEPT = 16  # stopped turns remembered per conversation, for fencing late pieces
SPECULATION_HOLD_MAX_S = 10.0  # a held speculative reply neither released nor stopped by then is dropped


@dataclass
class TurnAudio:
    """One reply's speech. `reply_to` is the user's turn whose audio it is (a speculative reply's
    own id differs from it); `held` collects what would go to the gateway until it is released."""

    reply_to: str | None = None
    started: bool = False
    chunks: int = 0
    tts_ms: float = 0.0
    first_chunk_ms: float | None = None
    rendered: int = 0  # pieces synthesized
    held: list[BusMessage] | None = None  # None: sent as it comes
    held_since: float | None = None  # perf_counter() when its first audio was held
    ended: bool = False  # its `TtsAudioDone` is among the held messages
    released: asyncio.Event = field(default_factory=asyncio.Event)
    synthesis: Job[bytes] | None = None  # the piece being synthesized (made urgent at a release)
    audio_s: float = 0.0  # the audio rendered so far, in seconds
    playing_since: float | None = None  # time.monotonic() when its audio started going out

    def ahead_s(self) -> float:
        """How much of the audio sent is still ahead of its listener, who plays it from the moment
        it started going out."""
        if self.playing_since is None:
            return 0.0
        return self.playing_since + self.audio_s - time.monotonic()

    @classmethod
    def of(cls, message: TtsSpeak | TtsEnd) -> "TurnAudio":
        """The speech of the reply `message` begins."""
        if isinstance(message, TtsSpeak):
            return cls(reply_to=message.reply_to or message.turn_id, held=[] if message.held else None)
        return cls(reply_to=message.turn_id)


@dataclass
class SpeechConversation:
    """What the TTS worker holds for one conversation; `aclose` releases all of it."""

    conversation_id: str
    route: Route
    queue: deque[TtsSpeak | TtsEnd] = field(default_factory=deque)
    marked: asyncio.Event = field(default_factory=asyncio.Event)  # the speaking mark is written
    turns: dict[str | None, TurnAudio] = field(default_factory=dict)
    speaker: asyncio.Task[None] | None = None
    winding_down: bool = False  # the speaker found the queue empty and takes no more pieces
    stopped_turns: RecentIds = field(default_factory=lambda: RecentIds(STOPPED_TURNS_KEPT))
    fence: Fence = field(default_factory=Fence)
    tasks: TaskSet = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = TaskSet(f"tts:{self.conversation_id}")

    def guard(self, turn_id: str | None) -> None:
        """Stop here if the conversation ended or this turn was stopped (checked around every await)."""
        self.fence.guard()
        if turn_id in self.stopped_turns:
            raise asyncio.CancelledError("turn stopped")

    @property
    def needs_speaker(self) -> bool:
        return self.speaker is None or self.speaker.done() or self.winding_down

    def drop_turn(self, turn_id: str | None) -> TurnAudio | None:
        """Forget a turn: its queued pieces, its state, and whatever of it still arrives."""
        self.stopped_turns.add(turn_id)
        self.queue = deque(item for item in self.queue if item.turn_id != turn_id)
        return self.turns.pop(turn_id, None)

    async def stop_speaker(self) -> None:
        task, self.speaker = self.speaker, None
        if task is not None:
            await stop_tasks([task])


class TtsWorker(Worker):
    stage = Stage.TTS

    def __init__(self, settings, client, voice: Voice | None = None) -> None:
        super().__init__(settings, client)
        self.voice = voice
        self.conversations: dict[str, SpeechConversation] = {}
        self.scheduler = FairScheduler("piper")  # the voice shared round-robin between conversations
        self.requests = OneShotRequests("speech", settings.max_requests_per_worker)
        self.speculation_wasted_s = 0.0  # synthesis time of speculative replies dropped unheard (`/metrics`)

    async def load(self) -> None:
        if self.voice is None and self.settings.null_mode:
            from workers.null import NullVoice

            self.voice = NullVoice(self.settings.null_compute_ms / 1000)
        if self.voice is None:
            s = self.settings
            self.voice = await asyncio.to_thread(
                Voice, s.tts_model_path, s.tts_config_path, s.inference_nice, s.inference_idle
            )
            await asyncio.to_thread(self.voice.warm_up)

    async def aclose(self) -> None:
        await super().aclose()
        await self.requests.aclose()
        self.scheduler.close()

    def extra_channels(self) -> list[str]:
        return [self.names.tts_control]

    def heartbeat_info(self) -> dict[str, object]:
        return {"sample_rate": self.voice.sample_rate if self.voice else None}

    def conversation_ids(self) -> list[str]:
        return list(self.conversations)

    def holds(self, conversation_id: str) -> dict[str, int]:
        conv = self.conversations.get(conversation_id)
        speaking = int(conv is not None and conv.speaker is not None and not conv.speaker.done())
        return {
            "conversation": int(conv is not None),
            "synthesis_tasks": speaking,
            "queued_requests": len(conv.queue) if conv else 0,
        }

    def resources(self) -> dict[str, int]:
        convs = self.conversations.values()
        return {
            "conversations": len(self.conversations),
            "synthesis_tasks": sum(1 for c in convs if c.speaker is not None and not c.speaker.done()),
            "queued_requests": sum(len(c.queue) for c in convs),
            "speech_requests": len(self.requests),
        }

    def busy(self, conversation_id: str) -> bool:
        """Speaking, or a turn began (a piece came) whose end has not come yet."""
        conv = self.conversations.get(conversation_id)
        return conv is not None and bool(conv.queue or conv.turns or (conv.speaker is not None and not conv.speaker.done()))

    async def cut(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        conv.fence.close()
        await conv.stop_speaker()
        gateway = conv.route.inbox(GATEWAY, self.names)
        # the gateway's ids of the turns begun here; a held speculative reply is unknown to the gateway
        turns = dict.fromkeys(
            [t.reply_to for t in conv.turns.values() if t.held is None]
            + [item.turn_id for item in conv.queue if item.turn_id not in conv.turns]
        )
        messages: list[tuple[str, BusMessage]] = []
        for turn_id in turns:
            envelope = {"conversation_id": conversation_id, "correlation_id": conv.route.correlation_id, "turn_id": turn_id}
            message = "the speech worker serving this turn shut down"
            messages += [(gateway, StageError(code="stage_failed", message=message, **envelope)), (gateway, TtsAudioDone(tts_ms=0, **envelope))]
        if messages:
            await self.bus.publish_many(messages)

    def continues(self, message: BusMessage) -> bool:
        return isinstance(message, TtsSpeak)  # its turn's `TtsEnd` follows

    async def close_conversation(self, conversation_id: str) -> None:
        conv = self.conversations.pop(conversation_id, None)
        if conv is None:
            return
        conv.fence.close()
        try:
            await conv.stop_speaker()
            conv.queue.clear()
            await conv.tasks.aclose()
            self.scheduler.drop(conversation_id)
        finally:
            await self.redis.delete(self.names.tts_active(conversation_id))  # "tts active" is false

    def follow_route(self, conversation_id: str, route: Route) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            conv.route = route

    async def prepare(self, conversation_id: str, route: Route) -> None:
        if conversation_id not in self.conversations:
            self.conversations[conversation_id] = SpeechConversation(conversation_id, route)

    async def handle(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, (TtsSpeak, TtsEnd)):
            conv = self.conversations.get(message.conversation_id)
            if conv is None:
                if not await self.admit(message):
                    return
                conv = self.conversations[message.conversation_id]
            if message.turn_id in conv.stopped_turns:
                return  # in flight when its turn was stopped
            if message.turn_id not in conv.turns:
                await self._drop_held(conv, "another reply began")
                conv.turns[message.turn_id] = TurnAudio.of(message)
            conv.queue.append(message)
            if conv.needs_speaker:
                await self._start_speaker(conv)
        elif isinstance(message, TtsRelease):
            await self._release(message)
        elif isinstance(message, TtsStop):
            await self._stop(message)
        elif isinstance(message, SpeechRequest):
            await self._speech(message)
        elif isinstance(message, RequestCancel):
            self.requests.cancel(message.conversation_id)
        else:
            log.warning("unexpected %s on %s", message.type, channel)

    async def _speech(self, request: SpeechRequest) -> None:
        """A one-shot speech request (POST /v1/audio/speech): spoken sentence by sentence through
        the fair scheduler under the request's id, each sentence's audio sent as soon as it exists."""
        reply_to = self.names.inbox(GATEWAY, request.gateway)
        envelope = {"conversation_id": request.conversation_id, "correlation_id": request.correlation_id}
        rate = self.voice.sample_rate

        async def work() -> None:
            splitter = SentenceSplitter(first_clause_min_words=4)
            pieces = splitter.feed(request.text + " ")
            if (rest := splitter.flush()) is not None:
                pieces.append(rest)
            sent, tts_ms = 0, 0.0
            try:
                for piece in pieces:
                    job = self.scheduler.submit(request.conversation_id, functools.partial(self.voice.synthesize, piece), "request")
                    pcm = await job
                    tts_ms += job.run_ms or 0.0
                    if pcm:
                        await self.bus.publish(reply_to, SpeechAudio(seq=sent, sample_rate=rate, pcm=pcm, **envelope))
                        sent += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("speech synthesis failed")
                done = SpeechDone(chunks=sent, code="stage_failed", message="the speech synthesis failed", **envelope)
            else:
                done = SpeechDone(chunks=sent, tts_ms=tts_ms, **envelope)
            finally:
                self.scheduler.drop(request.conversation_id)
            await self.bus.publish(reply_to, done)

        if self.closing:
            refusal = SpeechDone(code="stage_unavailable", message="the worker is shutting down", **envelope)
        elif not self.requests.start(request.conversation_id, work):
            refusal = SpeechDone(code="rate_limited", message="too many speech requests at once; retry shortly", **envelope)
        else:
            return
        await self.bus.publish(reply_to, refusal)

    async def _release(self, message: TtsRelease) -> None:
        """The speculative reply's turn is confirmed: its held audio goes out now, in order (what the
        speaker adds meanwhile joins the flush), and the speaker goes on with the rest."""
        conv = self.conversations.get(message.conversation_id)
        turn = conv.turns.get(message.turn_id) if conv is not None else None
        if turn is None or turn.held is None:
            return
        if turn.synthesis is not None and turn.rendered == 0:  # its first piece still waits for the voice:
            self.scheduler.promote(turn.synthesis)  # its user is waiting on it now
        gateway = conv.route.inbox(GATEWAY, self.names)
        turn.playing_since = time.monotonic()
        first = True
        while turn.held:
            batch, turn.held = turn.held, []
            if first and isinstance(batch[0], TtsAudioStarted) and turn.held_since is not None:
                batch[0].held_ms = round((time.perf_counter() - turn.held_since) * 1000, 1)
            first = False
            await self.bus.publish_many([(gateway, m) for m in batch])
            if conv.turns.get(message.turn_id) is not turn:
                return  # stopped, or the conversation ended, while it was sent
        turn.held = None
        turn.released.set()
        if turn.ended:
            conv.turns.pop(message.turn_id, None)

    def _dropped(self, turn: TurnAudio | None) -> None:
        if turn is not None and turn.held is not None:  # a speculation nobody heard
            self.speculation_wasted_s += turn.tts_ms / 1000

    async def _drop_held(self, conv: SpeechConversation, why: str) -> None:
        """Drop every held speculative reply of the conversation (its audio never sent)."""
        for turn_id in [t for t, audio in conv.turns.items() if audio.held is not None]:
            log.debug("held speculative reply dropped: %s", why)
            await self._stop(TtsStop(conversation_id=conv.conversation_id, turn_id=turn_id))

    async def _stop(self, message: TtsStop) -> None:
        conv = self.conversations.get(message.conversation_id)
        if conv is None:
            return
        if message.turn_id is None:
            if message.source not in ("", conv.route.llm):
                return  # an orchestrator the conversation was moved away from, letting go of it
            if message.connection_id in (None, conv.route.connection_id):
                # unfenced: the orchestrator may have let go only because it saw no lease (a Redis
                # restart) and the gateway writes it again; a real end fences here by its own event
                await self.end_conversation(message.conversation_id, "stopped by the orchestrator", fence=False)
            return
        if conv.queue and conv.queue[0].turn_id == message.turn_id:
            await conv.stop_speaker()  # it is speaking the stopped turn right now
        self._dropped(conv.drop_turn(message.turn_id))
        if not conv.queue:
            await self.redis.delete(self.names.tts_active(conv.conversation_id))
        elif conv.needs_speaker:
            await self._start_speaker(conv)

    async def _start_speaker(self, conv: SpeechConversation) -> None:
        """Start the conversation's speaker and mark the conversation as speaking.

        Only the bus reader writes the mark, the same coroutine that runs cleanup, so a cleanup's
        delete can never be overtaken by a mark still in flight from a cancelled task. The speaker
        synthesizes while the mark is written, and clears it only once it has been written. A
        speaker that is winding down (clearing the mark) is let finish first, so a piece that came
        just as it found the queue empty is spoken, after its mark was cleared."""
        if conv.speaker is not None and not conv.speaker.done():
            await asyncio.wait([conv.speaker])
        conv.winding_down = False
        conv.marked.clear()
        conv.speaker = conv.tasks.spawn(self._speak_through_outages(conv), name="speaker")
        try:
            await self.redis.set(
                self.names.tts_active(conv.conversation_id), "1", ex=max(1, int(self.settings.stale_timeout_s))
            )
        finally:
            conv.marked.set()

    async def _speak_through_outages(self, conv: SpeechConversation) -> None:
        """`_speak` until the queue stays empty, and a turn whose audio cannot be sent (Redis
        unreachable past the command retries) is dropped, so the turns after it are not stuck behind
        it; the gateway has already ended that turn for its client (gateway/recovery.py).

        A piece that arrives while `_speak` clears the speaking mark finds this speaker still
        running, so no new one is started for it: it is spoken here (a late piece, such as one whose
        publish was retried, would otherwise wait for ever)."""
        while True:
            try:
                await self._speak(conv)
                if not conv.queue:
                    return
            except (RedisError, OSError) as exc:
                if not conv.queue:
                    log.warning("could not clear the speaking mark: %s", exc)
                    return
                turn_id = conv.queue[0].turn_id
                log.warning("speech of turn %s dropped: Redis is unreachable (%s)", turn_id, exc)
                conv.stopped_turns.add(turn_id)
                conv.turns.pop(turn_id, None)
                conv.queue = deque(item for item in conv.queue if item.turn_id != turn_id)

    async def _speak(self, conv: SpeechConversation) -> None:
        """Speak queued pieces in order until the queue is empty, then clear the speaking mark. A
        piece that comes while the mark is being cleared starts a new speaker, which waits for this
        one to finish (`_start_speaker`), so it is spoken and marked again."""
        conv.winding_down = False
        await self._speak_queued(conv)
        conv.winding_down = True
        await conv.marked.wait()
        await self.redis.delete(self.names.tts_active(conv.conversation_id))

    async def _speak_queued(self, conv: SpeechConversation) -> None:
        gateway = conv.route.inbox(GATEWAY, self.names)
        while conv.queue:
            item = conv.queue[0]
            turn = conv.turns.get(item.turn_id)
            if turn is None:  # its turn was dropped while a piece of it was in flight
                conv.queue.popleft()
                continue
            envelope = {"conversation_id": conv.conversation_id, "correlation_id": conv.route.correlation_id, "turn_id": turn.reply_to}
            conv.guard(item.turn_id)
            if isinstance(item, TtsSpeak) and turn.held is not None and turn.rendered:
                try:  # a speculation renders its first piece only, until it is released
                    await asyncio.wait_for(turn.released.wait(), SPECULATION_HOLD_MAX_S)
                except TimeoutError:
                    log.info("a held speculative reply was neither released nor stopped; dropped")
                    self._dropped(conv.drop_turn(item.turn_id))
                    continue
                conv.guard(item.turn_id)
            if isinstance(item, TtsSpeak) and turn.held is None and turn.rendered:
                await self._pace(turn)
                conv.guard(item.turn_id)
            if isinstance(item, TtsSpeak):
                speak = functools.partial(self.voice.synthesize, item.text)
                # a reply's first piece is what its user waits on: before other replies' later pieces
                # (a speculation's, whose user has not finished, never goes before anyone)
                urgent = item.seq == 0 and turn.held is None
                synthesis = self.scheduler.submit(conv.conversation_id, speak, f"speak:{item.turn_id}", urgent=urgent)
                turn.synthesis = synthesis
                try:
                    pcm = await synthesis
                finally:
                    turn.synthesis = None
                conv.guard(item.turn_id)
                ms = synthesis.run_ms or 0.0
                turn.tts_ms += ms
                turn.rendered += 1
                if turn.first_chunk_ms is None:
                    turn.first_chunk_ms = round(ms, 1)
                await self._send_audio(conv, gateway, item.turn_id, turn, pcm, item.seq, envelope)
            else:
                done = TtsAudioDone(tts_ms=round(turn.tts_ms, 1), first_chunk_ms=turn.first_chunk_ms, **envelope)
                if turn.held is not None:  # sent with the rest at its release
                    turn.held.append(done)
                    turn.ended = True
                else:
                    conv.turns.pop(item.turn_id, None)
                    await self.bus.publish(gateway, done)
            if conv.queue and conv.queue[0] is item:
                conv.queue.popleft()

    async def _pace(self, turn: TurnAudio) -> None:
        """Wait until less than `TTS_LEAD_S` of the turn's audio is ahead of its listener."""
        lead = self.settings.tts_lead_s
        ahead = turn.ahead_s()
        if lead and ahead > lead:
            await self.wait_unless_draining(ahead - lead)

    async def _send_audio(
        self, conv: SpeechConversation, gateway: str, turn_id: str | None, turn: TurnAudio, pcm: bytes, piece: int, envelope: dict
    ) -> None:
        """The piece's audio in chunks of `TTS_CHUNK_MS`: the first at once (behind `audio.started`
        on a reply's first piece), then the rest together; one round trip each. `turn_id` is the
        reply's id here, `envelope` names the user's turn."""
        step = self.voice.sample_rate * self.settings.tts_chunk_ms // 1000 * 2  # whole samples: the bus refuses half ones
        head: list[BusMessage] = []
        if not turn.started:
            turn.started = True
            head.append(TtsAudioStarted(sample_rate=self.voice.sample_rate, **envelope))
        first_seq = turn.chunks
        turn.audio_s += len(pcm) / (2 * self.voice.sample_rate)
        if turn.held is None and turn.playing_since is None and pcm:
            turn.playing_since = time.monotonic()
        chunks = [
            TtsAudio(
                seq=first_seq + i,
                piece=piece,
                piece_end=min(len(pcm), start + step) / len(pcm),
                pcm=pcm[start : start + step],
                **envelope,
            )
            for i, start in enumerate(range(0, len(pcm), step))
        ]
        for batch in (chunks[:1], chunks[1:]):
            messages = head + batch
            head = []
            if messages and turn.held is not None:  # a speculative reply: kept until its release
                turn.held += messages
                turn.held_since = turn.held_since or time.perf_counter()
                turn.chunks += len(batch)
            elif messages:
                conv.guard(turn_id)
                await self.bus.publish_many([(gateway, message) for message in messages])
                turn.chunks += len(batch)
