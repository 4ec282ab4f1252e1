"""VAD/STT worker: one audio processor per conversation; utterances go to whisper, text goes on.

Whisper is shared between conversations through a fair scheduler (shared/fair.py): round-robin
between conversations, so one that commits in a loop cannot make another wait behind all of it.
What one conversation may queue is bounded too:
- transcriptions: when an utterance ends while the conversation's previous utterance is still
  waiting for the model (not started), the two are merged into that one waiting job (a short
  silence between them, the newest 30 s kept) and answered as the newer turn; the older turn gets
  an empty final transcript at once, so nothing waits for it. The user's words are not lost, and
  at most one final transcription per conversation ever waits;
- an early transcript of a pause (speculation) is one job, withdrawn if speech resumes;
- an interim transcript starts only when none is under way, and one that has not started yet is
  withdrawn when the utterance ends (it could only delay the final one).
Final transcripts leave in utterance order (`AudioConversation.order`).

Each conversation's client chooses its turn detection (`conversation.configured`): another end
silence, or manual turns ended only by `audio.commit` (workers/vad_stt/segmenter.py). The settings
live in the conversation's segmenter, so they go with it; a new owner after a hand-off starts from
the defaults until the gateway sends them again, which it does whenever the route changes.
The end of an utterance adapts to what was said (workers/vad_stt/turn_end.py): when a pause's early
transcript is ready, a finished sentence or question ends the utterance sooner
(`VAD_END_SILENCE_MIN_MS`), a clause left open ("... and") waits longer (`VAD_END_SILENCE_MAX_MS`).
A conversation whose client chose its own end silence keeps exactly that.
When the pause's early transcript is ready and the utterance goes on being silent, it also goes to
the orchestrator as `transcript.early` (setting `SPECULATIVE_REPLY`), which may start the reply on
it, held back until the turn's final transcript confirms the same text. The worker withdraws it
(`transcript.withdrawn`) when the user speaks again, or when the turn ends with nothing for the
orchestrator (an empty transcript), so a speculation never outlives the words it was started on.
`audio.clear` drops the utterance under way unanswered; a turn already announced to the gateway
(`speech.started`) ends as one too short to transcribe does, with `speech.stopped` and an empty
final transcript, so the gateway never waits for it."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import webrtcvad

from shared.clock import now_ms_float
from shared.fair import FairScheduler, Job
from shared.logging import log_content
from shared.messages import (
    AudioClear,
    AudioCommit,
    AudioIn,
    BusMessage,
    ConversationConfigured,
    RequestCancel,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    StageError,
    TranscriptEarly,
    TranscriptFinal,
    TranscriptionRequest,
    TranscriptionResult,
    TranscriptPartial,
    TranscriptWithdrawn,
)
from shared.resample import resample
from shared.stages import GATEWAY, Stage
from shared.tasks import Fence, TaskSet
from workers.requests import OneShotRequests
from workers.runtime import Route, Worker
from workers.vad_stt import segmenter as seg
from workers.vad_stt import turn_end
from workers.vad_stt.segmenter import BYTES_PER_MS, SAMPLE_RATE, Event, Segmenter
from workers.vad_stt.stt import MAX_WINDOW_S, Transcriber

log = logging.getLogger("voicepipe.vad_stt")

MERGE_GAP = bytes(300 * BYTES_PER_MS)  # silence between two merged utterances, so words do not run together
MERGED_MAX_BYTES = MAX_WINDOW_S * 1000 * BYTES_PER_MS  # a merged transcription keeps its newest 30 s


def is_speech(vad: webrtcvad.Vad, frame: bytes, sample_rate: int) -> bool:
    """webrtcvad's verdict on one frame. It takes 8, 16, 32 or 48 kHz; a 24 kHz frame is heard at
    48 kHz with each sample doubled: no filter, so no delay, and webrtcvad's own decimation to
    8 kHz removes what the doubling adds above 12 kHz."""
    if sample_rate == 24000:
        frame = np.repeat(np.frombuffer(frame, dtype="<i2"), 2).tobytes()
        sample_rate = 48000
    return vad.is_speech(frame, sample_rate)


def to_pipeline_rate(pcm: bytes, sample_rate: int) -> bytes:
    """An utterance at whisper's 16 kHz, converted whole (soxr, off a stream: no delay)."""
    return pcm if sample_rate == SAMPLE_RATE or not pcm else resample(pcm, sample_rate, SAMPLE_RATE)


@dataclass(eq=False)
class Utterance:
    """One utterance on its way through whisper. Until its job starts, a newer utterance of the same
    conversation can be merged into it; `turn_id` is then the newer turn's."""

    turn_id: str | None
    audio: bytearray
    job: Job[str] | None = None
    decided: float = 0.0  # perf_counter() at the end-of-speech decision of `turn_id`

    @property
    def mergeable(self) -> bool:
        return self.job is not None and not self.job.started and not self.job.future.done()

    def merge(self, audio: bytes, turn_id: str | None, decided: float) -> str | None:
        """Append a newer utterance; returns the turn this one answered until now."""
        self.audio += MERGE_GAP + audio
        del self.audio[: max(0, len(self.audio) - MERGED_MAX_BYTES)]
        superseded, self.turn_id, self.decided = self.turn_id, turn_id, decided
        return superseded


class AudioConversation:
    """Everything the worker holds for one conversation; `aclose` releases all of it."""

    def __init__(
        self, conversation_id: str, route: Route, segmenter: Segmenter, adaptive: bool = False, speculative: bool = False
    ) -> None:
        self.conversation_id = conversation_id
        self.route = route
        self.segmenter = segmenter
        self.adaptive = adaptive  # the end silence follows the early transcript (off once the client chose one)
        self.speculative = speculative  # the early transcript goes to the orchestrator (`transcript.early`)
        self.early_turn: str | None = None  # the turn whose early transcript the orchestrator holds
        self.turn_id: str | None = None
        self.tasks = TaskSet(f"vad_stt:{conversation_id}")
        self.fence = Fence()
        self.order = asyncio.Lock()  # final transcripts leave in utterance order (asyncio.Lock is FIFO)
        self.speculation: Utterance | None = None  # early transcript of a pause
        self.pending: Utterance | None = None  # the latest final transcription (mergeable until it starts)
        self.partial: Job[str] | None = None  # interim transcript queued or under way
        self.partial_at_bytes = 0  # utterance length at the last interim transcript
        self.last_activity_ms = now_ms_float()

    async def aclose(self) -> None:
        self.fence.close()
        await self.tasks.aclose()
        for utterance in (self.speculation, self.pending):  # a speculation has no task of its own
            if utterance is not None and utterance.job is not None:
                utterance.job.future.cancel()


class VadSttWorker(Worker):
    stage = Stage.VAD_STT

    def __init__(self, settings, client, transcriber: Transcriber | None = None) -> None:
        super().__init__(settings, client)
        self.transcriber = transcriber
        self.conversations: dict[str, AudioConversation] = {}
        self.completion: turn_end.Completion = turn_end.punctuation_rule  # text so far -> P(turn complete)
        self.end_adjusted = {"shortened": 0, "extended": 0}  # pauses whose end silence the transcript moved
        self.early_transcripts = {"final": 0, "stale": 0}  # pauses transcribed early: kept as the final, or not
        self.scheduler = FairScheduler("whisper")  # whisper shared round-robin between conversations
        self.requests = OneShotRequests("transcriptions", settings.max_requests_per_worker)

    async def load(self) -> None:
        if self.transcriber is None and self.settings.null_mode:
            from workers.null import NullTranscriber

            self.transcriber = NullTranscriber(self.settings.null_compute_ms / 1000)
        if self.transcriber is None:
            s = self.settings
            self.transcriber = await asyncio.to_thread(
                Transcriber,
                s.stt_model_path,
                threads=s.stt_threads,
                beam_size=s.stt_beam_size,
                window_s=s.stt_window_s,
                nice=s.inference_nice,
                idle=False,  # on every turn's critical path: nice, not SCHED_IDLE (shared/priority.py)
            )
            await asyncio.to_thread(self.transcriber.warm_up)

    async def aclose(self) -> None:
        await super().aclose()
        await self.requests.aclose()
        self.scheduler.close()

    def conversation_ids(self) -> list[str]:
        return list(self.conversations)

    def holds(self, conversation_id: str) -> dict[str, int]:
        conv = self.conversations.get(conversation_id)
        return {
            "audio_processor": int(conv is not None),
            "tasks": len(conv.tasks) if conv else 0,
            "buffered_audio_bytes": conv.segmenter.buffered_bytes if conv else 0,
            "queued_transcriptions": self.scheduler.waiting(conversation_id),
        }

    def resources(self) -> dict[str, int]:
        return {
            "conversations": len(self.conversations),
            "audio_processors": len(self.conversations),
            "tasks": sum(len(c.tasks) for c in self.conversations.values()),
            "queued_transcriptions": self.scheduler.waiting(),
            "requests": len(self.requests),
        }

    def busy(self, conversation_id: str) -> bool:
        """Inside an utterance, or transcribing one."""
        conv = self.conversations.get(conversation_id)
        return conv is not None and bool(conv.segmenter.speaking or len(conv.tasks))

    async def cut(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None or conv.turn_id is None:
            return
        await conv.aclose()
        await self._withdraw_early(conv, conv.turn_id)
        envelope = {"conversation_id": conversation_id, "correlation_id": conv.route.correlation_id, "turn_id": conv.turn_id}
        gateway = conv.route.inbox(GATEWAY, self.names)
        error = StageError(code="stage_failed", message="the speech recognizer serving this turn shut down", **envelope)
        await self.bus.publish_many([(gateway, error), (gateway, TranscriptFinal(text="", stt_ms=0, **envelope))])

    async def close_conversation(self, conversation_id: str) -> None:
        conv = self.conversations.pop(conversation_id, None)
        if conv is not None:
            await conv.aclose()
        self.scheduler.drop(conversation_id)

    def _new_segmenter(self) -> Segmenter:
        s = self.settings
        vad = webrtcvad.Vad(s.vad_aggressiveness)
        segmenter = Segmenter(
            lambda frame: is_speech(vad, frame, segmenter.sample_rate),
            frame_ms=s.vad_frame_ms,
            start_ms=s.vad_start_ms,
            end_silence_ms=s.vad_end_silence_ms,
            preroll_ms=s.vad_preroll_ms,
            min_utterance_ms=s.vad_min_utterance_ms,
            max_utterance_ms=s.vad_max_utterance_ms,
            speculate_after_ms=s.stt_speculate_after_ms,
            sustain_ms=s.barge_in_min_speech_ms,
        )
        return segmenter

    def follow_route(self, conversation_id: str, route: Route) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            conv.route = route

    async def prepare(self, conversation_id: str, route: Route) -> None:
        if conversation_id not in self.conversations:
            s = self.settings
            adaptive = s.stt_speculate_after_ms > 0 and s.vad_end_silence_min_ms < s.vad_end_silence_max_ms
            speculative = s.stt_speculate_after_ms > 0 and s.speculative_reply
            self.conversations[conversation_id] = AudioConversation(
                conversation_id, route, self._new_segmenter(), adaptive, speculative
            )
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
                rate = message.sample_rate or SAMPLE_RATE
                if rate != conv.segmenter.sample_rate:  # the first frame of a 24 kHz client
                    await self._emit(conv, conv.segmenter.set_rate(rate))
                await self._emit(conv, conv.segmenter.feed(message.pcm, message.received_ms))
                if self.settings.stt_partials:
                    self._maybe_partial(conv)
        elif isinstance(message, AudioCommit):
            conv = await self._conversation(message)
            if conv is not None:
                await self._emit(conv, conv.segmenter.commit(message.received_ms))
        elif isinstance(message, AudioClear):
            conv = await self._conversation(message)
            if conv is not None:  # an utterance under way ends empty: its turn ends at the gateway too
                await self._emit(conv, conv.segmenter.clear())
        elif isinstance(message, ConversationConfigured):
            conv = await self._conversation(message)
            if conv is not None:
                self._configure(conv, message)
        elif isinstance(message, TranscriptionRequest):
            await self._transcription(message)
        elif isinstance(message, RequestCancel):
            self.requests.cancel(message.conversation_id)
        else:
            log.warning("unexpected %s on %s", message.type, channel)

    def _configure(self, conv: AudioConversation, message: ConversationConfigured) -> None:
        """The client's turn detection, from the conversation's next utterance on (the one under way,
        if any, ends by the rule it started with)."""
        end_silence_ms = self.settings.vad_end_silence_ms if message.end_silence_ms is None else message.end_silence_ms
        manual = message.turn_detection == "manual"
        conv.segmenter.configure(end_silence_ms=end_silence_ms, manual=manual)
        conv.adaptive = False  # the client's own choice of end silence is kept as it is
        log.info("turn detection: %s", "manual" if manual else f"server VAD, {end_silence_ms} ms of silence")

    async def _transcription(self, request: TranscriptionRequest) -> None:
        """A one-shot transcription (POST /v1/audio/transcriptions): the whole clip, through the fair
        scheduler under the request's id, answered to the asking gateway."""
        reply_to = self.names.inbox(GATEWAY, request.gateway)
        envelope = {"conversation_id": request.conversation_id, "correlation_id": request.correlation_id}
        duration_s = len(request.pcm) / 2 / SAMPLE_RATE

        async def work() -> None:
            job = self.scheduler.submit(
                request.conversation_id, functools.partial(self.transcriber.transcribe, request.pcm), "request"
            )
            try:
                text = await job
            except Exception:
                log.exception("transcription failed")
                result = TranscriptionResult(code="stage_failed", message="the transcription failed", **envelope)
            else:
                log.info("transcribed %.1f s of audio in %.0f ms", duration_s, job.run_ms or 0)
                result = TranscriptionResult(text=text, duration_s=duration_s, stt_ms=job.run_ms, **envelope)
            finally:
                self.scheduler.drop(request.conversation_id)
            await self.bus.publish(reply_to, result)

        if self.closing:
            refusal = TranscriptionResult(code="stage_unavailable", message="the worker is shutting down", **envelope)
        elif not self.requests.start(request.conversation_id, work):
            refusal = TranscriptionResult(code="rate_limited", message="too many transcriptions at once; retry shortly", **envelope)
        else:
            return
        await self.bus.publish(reply_to, refusal)

    async def _emit(self, conv: AudioConversation, events: list[Event]) -> None:
        gateway_inbox = conv.route.inbox(GATEWAY, self.names)
        envelope = {"conversation_id": conv.conversation_id, "correlation_id": conv.route.correlation_id}
        for event in events:
            if isinstance(event, seg.SpeechStart):
                conv.turn_id = uuid.uuid4().hex[:16]
                conv.partial_at_bytes = 0
                await self.bus.publish(gateway_inbox, SpeechStarted(turn_id=conv.turn_id, **envelope))
                continue
            if isinstance(event, seg.SpeechSustained):  # long enough to be a barge-in: the gateway decides
                sustained = SpeechSustained(turn_id=conv.turn_id, onset_ms=event.onset_ms, **envelope)
                await self.bus.publish(gateway_inbox, sustained)
                continue
            if isinstance(event, seg.SpeechPaused):
                audio = to_pipeline_rate(event.audio, conv.segmenter.sample_rate)
                conv.speculation = self._transcribe(conv, Utterance(conv.turn_id, bytearray(audio)), "speculate")
                if conv.adaptive or conv.speculative:
                    conv.tasks.spawn(self._early_transcript(conv, conv.speculation), name="early-transcript")
                continue
            speculation, conv.speculation = conv.speculation, None
            if isinstance(event, seg.SpeechResumed):
                self._stale(speculation)  # the user went on speaking
                await self._withdraw_early(conv, conv.turn_id)
                continue
            decided = time.perf_counter()
            turn_id = conv.turn_id
            await self.bus.publish(
                gateway_inbox,
                SpeechStopped(
                    turn_id=turn_id, speech_end_ms=event.speech_end_ms, decided_ms=event.decided_ms, **envelope
                ),
            )
            if conv.partial is not None and not conv.partial.started:
                conv.partial.future.cancel()  # an interim transcript that has not started would only delay the final
            if not event.audio:
                self._stale(speculation)
                await self._withdraw_early(conv, turn_id)
                await self.bus.publish(gateway_inbox, TranscriptFinal(turn_id=turn_id, text="", stt_ms=0, **envelope))
                continue
            waiting = conv.pending
            if waiting is not None and waiting.mergeable:  # the model is busy: one job for both utterances
                self._stale(speculation)
                superseded = waiting.merge(to_pipeline_rate(event.audio, conv.segmenter.sample_rate), turn_id, decided)
                log.info("utterance merged into the previous one's transcription, which had not started yet")
                await self.bus.publish(gateway_inbox, TranscriptFinal(turn_id=superseded, text="", stt_ms=0, **envelope))
                continue
            utterance = speculation  # the early transcript is the final one: the utterance only gained silence
            if utterance is not None:
                self.early_transcripts["final"] += 1
                self.scheduler.promote(utterance.job)  # the user now waits on it
            if utterance is None:  # converted only when transcribed from scratch
                audio = to_pipeline_rate(event.audio, conv.segmenter.sample_rate)
                utterance = self._transcribe(conv, Utterance(turn_id, bytearray(audio)), "transcribe")
            utterance.turn_id, utterance.decided = turn_id, decided
            conv.pending = utterance
            conv.tasks.spawn(self._finish(conv, utterance), name=f"transcript:{turn_id}")

    def _stale(self, speculation: Utterance | None) -> None:
        """The pause's early transcript, if any, will not be the final one: its whisper job is
        cancelled (unless it already ran) and it is counted stale."""
        if speculation is not None:
            self.early_transcripts["stale"] += 1
            speculation.job.future.cancel()

    async def _early_transcript(self, conv: AudioConversation, utterance: Utterance) -> None:
        """Once the pause's early transcript exists: it sets how much silence ends the utterance
        (adaptive end of turn), which may end it at once; if the utterance goes on, the transcript
        goes to the orchestrator for a speculative reply. Between two bus messages, like one of them."""
        future = utterance.job.future
        await asyncio.wait([future])
        if future.cancelled() or future.exception() is not None:
            return  # the user went on speaking, or whisper failed (the final transcript says so)
        text = future.result()
        async with self._handling:
            if conv.speculation is not utterance or not conv.segmenter.speaking:
                return  # decided meanwhile, or speech resumed
            events: list[Event] = []
            if conv.adaptive:
                s = self.settings
                base = conv.segmenter.end_silence_ms
                silence = turn_end.end_silence_ms(self.completion(text), base, s.vad_end_silence_min_ms, s.vad_end_silence_max_ms)
                if silence != base:
                    self.end_adjusted["shortened" if silence < base else "extended"] += 1
                log.debug("end of this pause after %d ms of silence (from the early transcript)", silence)
                events = conv.segmenter.end_after(silence)
            if conv.speculative and text and not events:  # the turn goes on: worth replying ahead
                conv.early_turn = utterance.turn_id
                early = TranscriptEarly(
                    conversation_id=conv.conversation_id, correlation_id=conv.route.correlation_id, turn_id=utterance.turn_id, text=text
                )
                await self.bus.publish(conv.route.inbox(Stage.LLM, self.names), early)
            await self._emit(conv, events)

    async def _withdraw_early(self, conv: AudioConversation, turn_id: str | None) -> None:
        """The orchestrator's early transcript of `turn_id`, if it holds one, no longer stands."""
        if conv.early_turn is None or conv.early_turn != turn_id:
            return
        conv.early_turn = None
        withdrawn = TranscriptWithdrawn(conversation_id=conv.conversation_id, correlation_id=conv.route.correlation_id, turn_id=turn_id)
        await self.bus.publish(conv.route.inbox(Stage.LLM, self.names), withdrawn)

    def _maybe_partial(self, conv: AudioConversation) -> None:
        """Start an interim transcript when enough new speech arrived and none is queued or running."""
        audio = conv.segmenter.utterance
        step = self.settings.stt_partial_interval_ms * conv.segmenter.sample_rate * 2 // 1000  # bytes at its rate
        if not audio or len(audio) - conv.partial_at_bytes < step or (conv.partial and not conv.partial.future.done()):
            return
        conv.partial_at_bytes = len(audio)
        rate = conv.segmenter.sample_rate
        def transcribe() -> str:  # converted in whisper's thread, like the rest of its work
            return self.transcriber.transcribe(to_pipeline_rate(audio, rate))

        conv.partial = self.scheduler.submit(conv.conversation_id, transcribe, "partial")
        conv.tasks.spawn(self._send_partial(conv, conv.turn_id, conv.partial), name="partial")

    async def _send_partial(self, conv: AudioConversation, turn_id: str | None, job: Job[str]) -> None:
        text = await job
        conv.fence.guard()
        if text and conv.turn_id == turn_id and conv.segmenter.speaking:  # the turn is still being spoken
            partial = TranscriptPartial(
                conversation_id=conv.conversation_id, correlation_id=conv.route.correlation_id, turn_id=turn_id, text=text
            )
            await self.bus.publish(conv.route.inbox(GATEWAY, self.names), partial)

    def _transcribe(self, conv: AudioConversation, utterance: Utterance, label: str) -> Utterance:
        """Queue the utterance for whisper; the audio is read when the job starts, so merges count."""
        utterance.job = self.scheduler.submit(  # a final transcript goes before early and interim ones
            conv.conversation_id, lambda: self.transcriber.transcribe(bytes(utterance.audio)), label, urgent=label == "transcribe"
        )
        return utterance

    async def _finish(self, conv: AudioConversation, utterance: Utterance) -> None:
        async with conv.order:
            text = await utterance.job
            if conv.pending is utterance:
                conv.pending = None
            conv.fence.guard()  # the conversation ended while whisper ran: publish nothing for it
            turn_id, stt_ms = utterance.turn_id, utterance.job.run_ms or 0.0
            wait_ms = (time.perf_counter() - utterance.decided) * 1000
            final = TranscriptFinal(
                conversation_id=conv.conversation_id,
                correlation_id=conv.route.correlation_id,
                turn_id=turn_id,
                text=text,
                stt_ms=round(stt_ms, 1),
                stt_wait_ms=round(wait_ms, 1),
            )
            to_gateway = (conv.route.inbox(GATEWAY, self.names), final)
            if conv.early_turn == turn_id and text:
                conv.early_turn = None  # the final transcript confirms or replaces it at the orchestrator
            else:
                await self._withdraw_early(conv, turn_id)
            if text:  # one round trip, the orchestrator first: the reply is the critical path
                reached, _ = await self.bus.publish_many([(conv.route.inbox(Stage.LLM, self.names), final), to_gateway])
                if not reached:  # the orchestrator is gone: the gateway ends the turn and re-routes
                    lost = StageError(
                        conversation_id=conv.conversation_id,
                        correlation_id=conv.route.correlation_id,
                        turn_id=turn_id,
                        code="stage_failed",
                        message="the llm worker serving this turn stopped",
                    )
                    await self.bus.publish(to_gateway[0], lost)
            else:
                await self.bus.publish(*to_gateway)
        log_content(
            log, self.settings.log_content, "transcribed in %.0f ms (%.0f ms after end of speech)", stt_ms, wait_ms, content=text
        )
