"""VAD/STT worker: one audio processor per conversation; utterances go to whisper, text goes on."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import webrtcvad

from shared.clock import now_ms_float
from shared.logging import log_content
from shared.messages import (
    AudioCommit,
    AudioIn,
    BusMessage,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    TranscriptFinal,
    TranscriptPartial,
)
from shared.tasks import Fence, TaskSet
from workers.runtime import Route, Worker
from workers.vad_stt import segmenter as seg
from workers.vad_stt.segmenter import SAMPLE_RATE, Event, Segmenter
from workers.vad_stt.stt import Transcriber

log = logging.getLogger("voicepipe.vad_stt")


class AudioConversation:
    """Everything the worker holds for one conversation; `aclose` releases all of it."""

    def __init__(self, conversation_id: str, route: Route, segmenter: Segmenter) -> None:
        self.conversation_id = conversation_id
        self.route = route
        self.segmenter = segmenter
        self.turn_id: str | None = None
        self.tasks = TaskSet(f"vad_stt:{conversation_id}")
        self.fence = Fence()
        self.transcribe_lock = asyncio.Lock()  # transcripts leave in utterance order
        self.speculation: asyncio.Task[tuple[str, float]] | None = None  # early transcript of a pause
        self.partial: asyncio.Task[None] | None = None  # interim transcript under way
        self.partial_at_bytes = 0  # utterance length at the last interim transcript
        self.last_activity_ms = now_ms_float()

    async def aclose(self) -> None:
        self.fence.close()
        await self.tasks.aclose()


class VadSttWorker(Worker):
    stage = "vad_stt"

    def __init__(self, settings, client, transcriber: Transcriber | None = None) -> None:
        super().__init__(settings, client)
        self.transcriber = transcriber
        self.conversations: dict[str, AudioConversation] = {}

    async def load(self) -> None:
        if self.transcriber is None:
            s = self.settings
            self.transcriber = await asyncio.to_thread(
                Transcriber,
                s.stt_model_path,
                threads=s.stt_threads,
                beam_size=s.stt_beam_size,
                window_s=s.stt_window_s,
                nice=s.inference_nice,
                idle=s.inference_idle,
            )
            await asyncio.to_thread(self.transcriber.warm_up)

    def conversation_ids(self) -> list[str]:
        return list(self.conversations)

    def holds(self, conversation_id: str) -> dict[str, int]:
        conv = self.conversations.get(conversation_id)
        return {
            "audio_processor": int(conv is not None),
            "tasks": len(conv.tasks) if conv else 0,
            "buffered_audio_bytes": conv.segmenter.buffered_bytes if conv else 0,
        }

    def resources(self) -> dict[str, int]:
        return {
            "conversations": len(self.conversations),
            "audio_processors": len(self.conversations),
            "tasks": sum(len(c.tasks) for c in self.conversations.values()),
        }

    async def close_conversation(self, conversation_id: str) -> None:
        conv = self.conversations.pop(conversation_id, None)
        if conv is not None:
            await conv.aclose()

    def _new_segmenter(self) -> Segmenter:
        s = self.settings
        vad = webrtcvad.Vad(s.vad_aggressiveness)
        return Segmenter(
            lambda frame: vad.is_speech(frame, SAMPLE_RATE),
            frame_ms=s.vad_frame_ms,
            start_ms=s.vad_start_ms,
            end_silence_ms=s.vad_end_silence_ms,
            preroll_ms=s.vad_preroll_ms,
            min_utterance_ms=s.vad_min_utterance_ms,
            max_utterance_ms=s.vad_max_utterance_ms,
            speculate_after_ms=s.stt_speculate_after_ms,
            sustain_ms=s.barge_in_min_speech_ms,
        )

    async def prepare(self, conversation_id: str, route: Route) -> None:
        if conversation_id not in self.conversations:
            self.conversations[conversation_id] = AudioConversation(conversation_id, route, self._new_segmenter())
            log.info("audio processor opened")

    async def _conversation(self, message: BusMessage) -> AudioConversation | None:
        conv = self.conversations.get(message.conversation_id)
        if conv is None:
            if not await self.admit(message):
                return None
            conv = self.conversations[message.conversation_id]
        conv.last_activity_ms = now_ms_float()
        return conv

    async def handle(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, AudioIn):
            conv = await self._conversation(message)
            if conv is not None:
                await self._emit(conv, conv.segmenter.feed(message.pcm, message.received_ms))
                if self.settings.stt_partials:
                    self._maybe_partial(conv)
        elif isinstance(message, AudioCommit):
            conv = await self._conversation(message)
            if conv is not None:
                await self._emit(conv, conv.segmenter.commit(message.received_ms))
        else:
            log.warning("unexpected %s on %s", message.type, channel)

    async def _emit(self, conv: AudioConversation, events: list[Event]) -> None:
        gateway_inbox = self.names.inbox("gateway", conv.route.gateway)
        envelope = {"conversation_id": conv.conversation_id, "correlation_id": conv.route.correlation_id}
        for event in events:
            if isinstance(event, seg.SpeechStart):
                conv.turn_id = uuid.uuid4().hex[:16]
                conv.partial_at_bytes = 0
                await self.bus.publish(gateway_inbox, SpeechStarted(turn_id=conv.turn_id, **envelope))
                continue
            if isinstance(event, seg.SpeechSustained):  # long enough to be a barge-in: the gateway decides
                await self.bus.publish(gateway_inbox, SpeechSustained(turn_id=conv.turn_id, **envelope))
                continue
            if isinstance(event, seg.SpeechPaused):
                conv.speculation = conv.tasks.spawn(self._whisper(conv, event.audio), name="speculate")
                continue
            speculation, conv.speculation = conv.speculation, None
            if isinstance(event, seg.SpeechResumed):
                if speculation is not None:
                    speculation.cancel()  # the user went on speaking: that early transcript is stale
                continue
            decided = time.perf_counter()
            turn_id = conv.turn_id
            await self.bus.publish(
                gateway_inbox,
                SpeechStopped(
                    turn_id=turn_id, speech_end_ms=event.speech_end_ms, decided_ms=event.decided_ms, **envelope
                ),
            )
            if event.audio:
                if speculation is None:
                    speculation = conv.tasks.spawn(self._whisper(conv, event.audio), name="transcribe")
                conv.tasks.spawn(self._finish(conv, turn_id, speculation, decided), name=f"transcript:{turn_id}")
            else:
                if speculation is not None:
                    speculation.cancel()
                await self.bus.publish(gateway_inbox, TranscriptFinal(turn_id=turn_id, text="", stt_ms=0, **envelope))

    def _maybe_partial(self, conv: AudioConversation) -> None:
        """Start an interim transcript when enough new speech arrived and none is running."""
        audio = conv.segmenter.utterance
        step = self.settings.stt_partial_interval_ms * 32  # bytes of 16 kHz PCM16
        if not audio or len(audio) - conv.partial_at_bytes < step or (conv.partial and not conv.partial.done()):
            return
        conv.partial_at_bytes = len(audio)
        conv.partial = conv.tasks.spawn(self._send_partial(conv, conv.turn_id, audio), name="partial")

    async def _send_partial(self, conv: AudioConversation, turn_id: str | None, audio: bytes) -> None:
        text, _ms = await self._whisper(conv, audio)
        conv.fence.guard()
        if text and conv.turn_id == turn_id and conv.segmenter.speaking:  # the turn is still being spoken
            partial = TranscriptPartial(
                conversation_id=conv.conversation_id, correlation_id=conv.route.correlation_id, turn_id=turn_id, text=text
            )
            await self.bus.publish(self.names.inbox("gateway", conv.route.gateway), partial)

    async def _whisper(self, conv: AudioConversation, audio: bytes) -> tuple[str, float]:
        async with conv.transcribe_lock:
            return await self.transcriber.atranscribe(audio)

    async def _finish(
        self, conv: AudioConversation, turn_id: str | None, transcription: asyncio.Task[tuple[str, float]], decided: float
    ) -> None:
        text, stt_ms = await transcription
        conv.fence.guard()  # the conversation ended while whisper ran: publish nothing for it
        wait_ms = (time.perf_counter() - decided) * 1000
        final = TranscriptFinal(
            conversation_id=conv.conversation_id,
            correlation_id=conv.route.correlation_id,
            turn_id=turn_id,
            text=text,
            stt_ms=round(stt_ms, 1),
            stt_wait_ms=round(wait_ms, 1),
        )
        to_gateway = (self.names.inbox("gateway", conv.route.gateway), final)
        if text:  # one round trip, the orchestrator first: the reply is the critical path
            await self.bus.publish_many([(self.names.inbox("llm", conv.route.llm), final), to_gateway])
        else:
            await self.bus.publish(*to_gateway)
        log_content(
            log, self.settings.log_content, "transcribed in %.0f ms (%.0f ms after end of speech)", stt_ms, wait_ms, content=text
        )
