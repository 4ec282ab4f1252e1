"""The generation engine: one llama.cpp context holding a KV sequence per conversation, stepped by
one thread, every request in flight advanced by the same batch (continuous batching).

Why a sequence per conversation: a voice conversation's next request (the next slice of a reply,
or the next turn) repeats everything the previous one said and adds a little. A server with one
KV cache keeps only the last request's state, so with several conversations interleaved each
request evaluates its whole prompt again, at 4-7 ms a token on a loaded machine: seconds by the
fifth turn. Here a request goes to the idle sequence that keeps the most of its prompt for the
fewest other cached tokens thrown away (its own conversation's, unless that one was evicted), and
only the rest of the prompt is evaluated. Nothing is copied: the state stays where llama.cpp computed it. Which
sequence that is needs no conversation id from the client; the prompt itself tells.

Why one batch for all: requests advance together instead of queueing whole replies behind each
other, and a step of several tokens costs less than as many steps of one (on two cores with
SmolLM2-135M: 7.8 ms for one sequence, 23.4 ms for four; the model is small enough that the
arithmetic, not reading the weights, dominates, which is why the orchestrator still schedules
first pieces ahead of other replies, workers/llm_orchestrator/slices.py). Each step takes one token for every generating request first, then fills the
rest of the batch with prompt tokens (at most `prompt_chunk` per request), so a long prompt delays
the others' next tokens by one chunk at most.

Threads: the engine thread owns the llama.cpp objects; callers submit a `Request` and read its
events from an asyncio queue, fed with `call_soon_threadsafe`. `Request.cancel()` (a client that
left) is seen at the next step; the sequence keeps what was evaluated, for the next request."""
from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals

log = logging.getLogger("voicepipe.llm_server")

PENALTY_LAST_N = 64  # as llama-cpp-python's server: the repeat penalty looks at the last 64 tokens


class PromptRejected(ValueError):
    """The prompt is empty or does not fit a sequence's context."""


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the sampler (the OpenAI fields, with llama-cpp-python's defaults)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    """One step of a request's output: text (may be empty), and its end: "stop" (the model ended
    or a stop string came), "length" (max_tokens) or "error"."""

    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    events: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    # filled in by the engine
    cached_tokens: int = 0  # prompt tokens found in the sequence's cache
    completion_tokens: int = 0

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread at its next step

    def _emit(self, delta: Delta) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.events.put_nowait, delta)


class _Sequence:
    """One KV sequence: the tokens it holds now, and the request using it (None: idle)."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.tokens: list[int] = []
        self.request: Request | None = None
        self.used_at = 0.0
        # the request's state while it runs
        self.todo: list[int] = []  # prompt tokens not evaluated yet, or the sampled token to feed
        self.sampler: _internals.LlamaSampler | None = None
        self.decoder: codecs.IncrementalDecoder | None = None
        self.text = ""  # the output not yet emitted (held back while it may start a stop string)
        self.generated = 0


def _reuse(cached: list[int], prompt: list[int]) -> int:
    kept = common_prefix(cached, prompt)
    return kept - (len(cached) - kept)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(
        self,
        model_path: str,
        *,
        sequences: int = 8,
        ctx_per_sequence: int = 2048,
        threads: int = 2,
        batch: int = 256,
        prompt_chunk: int = 128,
    ) -> None:
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.model = _internals.LlamaModel(path_model=model_path, params=llama_cpp.llama_model_default_params(), verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * ctx_per_sequence
        params.n_batch = params.n_ubatch = batch
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # each sequence its own stream: attention looks at its own tokens only
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch_size = batch
        self.prompt_chunk = min(prompt_chunk, batch)
        self.ctx_per_sequence = ctx_per_sequence
        self._batch = _internals.LlamaBatch(n_tokens=batch, embd=0, n_seq_max=1, verbose=False)
        self._sequences = [_Sequence(i) for i in range(sequences)]
        self._pending: deque[Request] = deque()
        self._wake = threading.Condition()
        self._running = True
        self._piece = ctypes.create_string_buffer(256)
        self.add_bos = self.model.add_bos_token()
        # counters for /metrics-like introspection and the tests
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "steps": 0}
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special tokens in `text` (ChatML's `<|im_start|>`) are read as such; the model's BOS is
        added when it asks for one, unless `add_bos` says otherwise (a chat template writes it)."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=self.add_bos if add_bos is None else add_bos, special=True)

    def token_text(self, token: int) -> str:
        return self.model.token_to_piece(token, special=True).rstrip(b"\0").decode("utf-8", "replace")

    def submit(self, request: Request) -> None:
        """Queue a request (PromptRejected when it cannot fit); its deltas arrive on request.events."""
        if not request.prompt:
            raise PromptRejected("the prompt is empty")
        if len(request.prompt) >= self.ctx_per_sequence:
            raise PromptRejected(
                f"the prompt is {len(request.prompt)} tokens; this server's context holds {self.ctx_per_sequence - 1}"
            )
        request.loop = asyncio.get_running_loop()
        with self._wake:
            self._pending.append(request)
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(1 for s in self._sequences if s.request is not None) + len(self._pending)

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(10)

    # ---- the engine thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._pending and not any(s.request for s in self._sequences):
                    self._wake.wait()
                if not self._running:
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode ends every request in it, not the server
                log.exception("generation step failed")
                for seq in self._sequences:
                    if seq.request is not None:
                        self._finish(seq, Delta("", "error", f"generation failed: {exc}"))
                    llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)  # what it holds is unknown now
                    seq.tokens = []
        for seq in self._sequences:
            if seq.request is not None:
                self._finish(seq, Delta("", "error", "the server is stopping"))

    def _admit(self) -> None:
        """Give each waiting request the idle sequence that serves it best: the most prompt tokens
        kept for the fewest another conversation's cached tokens thrown away (so a new conversation
        takes an empty sequence rather than another one's for their common system prompt), and of
        equals the least recently used."""
        while self._pending:
            idle = [s for s in self._sequences if s.request is None]
            if not idle:
                return
            request = self._pending.popleft()
            if request.cancelled:
                continue
            seq = max(idle, key=lambda s: (_reuse(s.tokens, request.prompt), -s.used_at))
            kept = common_prefix(seq.tokens, request.prompt)
            kept = min(kept, len(request.prompt) - 1)  # the last prompt token is evaluated again for its logits
            if not llama_cpp.llama_memory_seq_rm(self.memory, seq.id, kept, -1):
                kept = 0
                llama_cpp.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
            seq.tokens = seq.tokens[:kept]
            seq.todo = request.prompt[kept:]
            seq.request = request
            seq.generated = 0
            seq.text = ""
            seq.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            seq.sampler = self._sampler(request.sampling, request.prompt[-PENALTY_LAST_N:])
            request.cached_tokens = kept
            request.max_tokens = min(request.max_tokens, self.ctx_per_sequence - len(request.prompt))
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(request.prompt)
            self.stats["cached_tokens"] += kept

    def _sampler(self, s: Sampling, recent: list[int]) -> _internals.LlamaSampler:
        sampler = _internals.LlamaSampler()
        sampler.add_penalties(
            n_vocab=self.model.n_vocab(), penalty_last_n=PENALTY_LAST_N, penalty_repeat=s.repeat_penalty,
            penalty_freq=s.frequency_penalty, penalty_present=s.presence_penalty,
        )
        if s.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(s.top_k)
            sampler.add_top_p(s.top_p, 1)
            sampler.add_min_p(s.min_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(s.seed & 0xFFFFFFFF if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        for token in recent:
            sampler.accept(token)
        return sampler

    def _step(self) -> None:
        batch = self._batch.batch
        batch.n_tokens = 0
        outputs: list[tuple[_Sequence, int]] = []  # (sequence, batch index of its logits)

        def add(seq: _Sequence, tokens: list[int], logits_last: bool) -> None:
            for i, token in enumerate(tokens):
                j = batch.n_tokens
                batch.token[j] = token
                batch.pos[j] = len(seq.tokens) + i
                batch.seq_id[j][0] = seq.id
                batch.n_seq_id[j] = 1
                batch.logits[j] = logits_last and i == len(tokens) - 1
                batch.n_tokens += 1
            seq.tokens.extend(tokens)
            if logits_last:
                outputs.append((seq, batch.n_tokens - 1))

        running = []
        for seq in self._sequences:
            if seq.request is None:
                continue
            if seq.request.cancelled:
                self._forget(seq)
                continue
            running.append(seq)
        # a token for every generating request first, then prompt chunks in the room left
        for seq in running:
            if len(seq.todo) == 1 and seq.generated:
                add(seq, seq.todo, True)
                seq.todo = []
        room = self.batch_size - batch.n_tokens
        for seq in running:
            if seq.todo and room > 0:
                take = min(len(seq.todo), self.prompt_chunk, room)
                chunk, seq.todo = seq.todo[:take], seq.todo[take:]
                add(seq, chunk, not seq.todo)
                room -= take
        if batch.n_tokens == 0:
            return
        self.ctx.decode(self._batch)
        self.stats["steps"] += 1
        now = time.monotonic()
        for seq, index in outputs:
            assert seq.request is not None and seq.sampler is not None
            seq.used_at = now
            token = seq.sampler.sample(self.ctx, index)
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        request = seq.request
        assert request is not None and seq.decoder is not None
        seq.generated += 1
        request.completion_tokens = seq.generated
        self.stats["completion_tokens"] += 1
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(seq, Delta(seq.text + seq.decoder.decode(b"", final=True), "stop"))
            return
        if llama_cpp.llama_vocab_is_control(self.model.vocab, token):
            piece = ""
            if self.token_text(token) in request.stop:
                self._finish(seq, Delta(seq.text, "stop"))
                return
        else:
            piece = seq.decoder.decode(self._token_bytes(token))
        seq.text += piece
        for stop in request.stop:
            at = seq.text.find(stop)
            if at >= 0:
                self._finish(seq, Delta(seq.text[:at], "stop"))
                return
        if seq.generated >= request.max_tokens:
            self._finish(seq, Delta(seq.text + seq.decoder.decode(b"", final=True), "length"))
            return
        # hold back the end of the text while it could be the start of a stop string
        hold = max((_overlap(seq.text, stop) for stop in request.stop), default=0)
        ready, seq.text = seq.text[: len(seq.text) - hold], seq.text[len(seq.text) - hold :]
        if ready:
            request._emit(Delta(ready))
        seq.todo = [token]

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)]

    def _finish(self, seq: _Sequence, delta: Delta) -> None:
        """The request's last delta; the sequence goes idle (its tokens stay cached, but the last
        sampled one, which was never evaluated)."""
        assert seq.request is not None
        seq.request._emit(delta)
        self._forget(seq)

    def _forget(self, seq: _Sequence) -> None:
        seq.request = None
        seq.todo = []
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.decoder = None


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp's warnings and errors into this log; its info lines (dozens at every start) dropped.
    (ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.)"""
    if level in (3, 4):
        log.log(logging.WARNING if level == 3 else logging.ERROR, "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def _overlap(text: str, stop: str) -> int:
    """How many characters at the end of `text` are a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
