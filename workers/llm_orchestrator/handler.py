"""LLM orchestrator: one reply task per conversation; text to the gateway, pieces to TTS, history kept."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shared.messages import (
    BusMessage,
    ResponseCancel,
    ResponseTextDelta,
    ResponseTextDone,
    StageError,
    TextInput,
    TranscriptFinal,
    TtsEnd,
    TtsSpeak,
    TtsStop,
)
from shared.tasks import Fence, TaskSet, stop_tasks
from workers.llm_orchestrator.history import HistoryStore, Message, trim
from workers.llm_orchestrator.llm_client import ChatClient, LlmUnavailable
from workers.llm_orchestrator.sentences import SentenceSplitter
from workers.runtime import Route, Worker

log = logging.getLogger("voicepipe.llm")


class ChatConversation:
    """What the orchestrator holds for one conversation: at most one reply under way."""

    def __init__(self, conversation_id: str, route: Route, history: list[Message]) -> None:
        self.conversation_id = conversation_id
        self.route = route
        self.history = history  # as the LLM sees it (trimmed); written through to Redis after each reply
        self.tasks = TaskSet(f"llm:{conversation_id}")
        self.fence = Fence()
        self.reply: asyncio.Task[None] | None = None
        self.reply_turn: str | None = None
        self.reply_fence = Fence()
        self.upstream_streams = 0  # open HTTP streams to the LLM server

    @property
    def replying(self) -> bool:
        return self.reply is not None and not self.reply.done()

    async def cancel_reply(self) -> str | None:
        """Stop the reply under way (closing its upstream stream); returns its turn id."""
        task, turn = self.reply, self.reply_turn
        self.reply, self.reply_turn = None, None
        self.reply_fence.close()
        if task is not None and not task.done():
            await stop_tasks([task])
            return turn
        return None


class LlmWorker(Worker):
    stage = "llm"

    def __init__(self, settings, client, chat: ChatClient | None = None) -> None:
        super().__init__(settings, client)
        self.chat = chat
        self.conversations: dict[str, ChatConversation] = {}
        self.history = HistoryStore(
            client,
            self.names,
            ttl_s=settings.resume_window_s,
            max_messages=settings.history_max_messages,
            max_chars=settings.history_max_chars,
        )

    async def load(self) -> None:
        if self.chat is None:
            s = self.settings
            if not s.llm_base_url:
                raise SystemExit("VOICEPIPE_LLM_BASE_URL is not set (voicepipe up starts an embedded LLM for you)")
            self.chat = ChatClient(
                s.llm_base_url,
                s.llm_model,
                api_key=s.llm_api_key,
                timeout_s=s.llm_read_timeout_s,
                max_tokens=s.llm_max_tokens,
                temperature=s.llm_temperature,
            )

    async def aclose(self) -> None:
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
            "generation_tasks": int(conv.replying) if conv else 0,
            "upstream_streams": conv.upstream_streams if conv else 0,
        }

    def resources(self) -> dict[str, int]:
        convs = self.conversations.values()
        return {
            "conversations": len(self.conversations),
            "generation_tasks": sum(c.replying for c in convs),
            "upstream_streams": sum(c.upstream_streams for c in convs),
        }

    async def close_conversation(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        conv.fence.close()
        try:
            await conv.cancel_reply()  # closes the upstream LLM stream at once
            await conv.tasks.aclose()
            await self.bus.publish(
                self.names.tts_control,
                TtsStop(conversation_id=conversation_id, correlation_id=conv.route.correlation_id),
            )
            await self.history.keep_for_resume(conversation_id)
        finally:
            self.conversations.pop(conversation_id, None)

    async def handle(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, (TranscriptFinal, TextInput)):
            conv = await self._conversation(message)
            if conv is not None and message.text.strip():
                await self._stop_reply(conv)
                conv.reply_turn, conv.reply_fence = message.turn_id, Fence()
                conv.reply = conv.tasks.spawn(
                    self._respond(conv, conv.reply_fence, message.turn_id, message.text), name="reply"
                )
        elif isinstance(message, ResponseCancel):
            conv = self.conversations.get(message.conversation_id)
            if conv is not None:
                await self._stop_reply(conv)
        else:
            log.warning("unexpected %s on %s", message.type, channel)

    async def prepare(self, conversation_id: str, route: Route) -> None:
        if conversation_id not in self.conversations:  # the history is read now, not on the first turn
            history = await self.history.load(conversation_id)
            self.conversations[conversation_id] = ChatConversation(conversation_id, route, history)

    async def _conversation(self, message: BusMessage) -> ChatConversation | None:
        conv = self.conversations.get(message.conversation_id)
        if conv is None:
            if not await self.admit(message):
                return None
            conv = self.conversations[message.conversation_id]
        return conv

    async def _stop_reply(self, conv: ChatConversation) -> None:
        turn = await conv.cancel_reply()
        if turn is not None:
            log.info("reply for turn %s stopped", turn)
            await self.bus.publish(
                self.names.tts_control,
                TtsStop(conversation_id=conv.conversation_id, correlation_id=conv.route.correlation_id, turn_id=turn),
            )

    async def _respond(self, conv: ChatConversation, fence: Fence, turn_id: str | None, user_text: str) -> None:
        envelope = {"conversation_id": conv.conversation_id, "correlation_id": conv.route.correlation_id, "turn_id": turn_id}
        gateway = self.names.inbox("gateway", conv.route.gateway)
        tts = self.names.inbox("tts", conv.route.tts)
        messages = [{"role": "system", "content": self.settings.system_prompt}, *conv.history, {"role": "user", "content": user_text}]
        splitter = SentenceSplitter(self.settings.first_clause_min_words, self.settings.first_piece_max_words)
        reply: list[str] = []
        first_sentence_ms: float | None = None
        failed = False
        started = time.perf_counter()

        async def send(*items: tuple[str, BusMessage]) -> None:
            """Publish (several in one round trip) unless this reply or the conversation has ended;
            checked on both sides of the await."""
            fence.guard()
            conv.fence.guard()
            await self.bus.publish_many(items)
            fence.guard()

        def to_tts(pieces: list[str]) -> list[tuple[str, BusMessage]]:
            nonlocal first_sentence_ms
            if pieces and first_sentence_ms is None:
                first_sentence_ms = round((time.perf_counter() - started) * 1000, 1)
            first_seq = splitter.pieces - len(pieces)
            return [(tts, TtsSpeak(text=piece, seq=first_seq + i, **envelope)) for i, piece in enumerate(pieces)]

        conv.upstream_streams += 1
        try:
            async with contextlib.aclosing(self.chat.stream_chat(messages)) as stream:
                async for delta in stream:
                    reply.append(delta)
                    # a finished piece goes to TTS first, in the same round trip as the text delta
                    await send(*to_tts(splitter.feed(delta)), (gateway, ResponseTextDelta(delta=delta, **envelope)))
        except LlmUnavailable as exc:
            failed = True
            log.warning("LLM failed: %s", exc)
            await send((gateway, StageError(code="llm_unavailable", message=str(exc), **envelope)))
        finally:
            conv.upstream_streams -= 1
        llm_ms = round((time.perf_counter() - started) * 1000, 1)
        rest = splitter.flush()
        closing = to_tts([rest] if rest is not None else [])
        if splitter.pieces:
            closing.append((tts, TtsEnd(sentences=splitter.pieces, **envelope)))
        text = "".join(reply).strip()
        done = ResponseTextDone(
            text=text, sentences=splitter.pieces, llm_ms=llm_ms, first_sentence_ms=first_sentence_ms, **envelope
        )
        await send(*closing, (gateway, done))
        log.info("reply of %d pieces in %.0f ms (first piece at %s ms)", splitter.pieces, llm_ms, first_sentence_ms)
        if not failed and text:
            fence.guard()
            turn: list[Message] = [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
            s = self.settings
            conv.history = trim(conv.history + turn, s.history_max_messages, s.history_max_chars)
            await self.history.append(conv.conversation_id, *turn)
