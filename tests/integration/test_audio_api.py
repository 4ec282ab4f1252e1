"""The OpenAI Audio API (`/v1/audio/transcriptions`, `/v1/audio/speech`) through the stock `openai`
SDK, served by the real VAD/STT and TTS workers (real whisper and piper) over real Redis."""
from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path

import httpx
import openai
import pytest

from shared.audiofile import SpeechEncoder, decode_audio
from tests.conftest import make_settings
from tests.support.stack import run_stack
from voicepipe.wavio import read_audio_16k_mono

FIXTURES = Path(__file__).parent.parent / "fixtures"
LONG_TEXT = " ".join(f"This is sentence number {n} of a long text that takes a while to speak." for n in range(1, 30))


def sdk(stack, token: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=token, max_retries=0, timeout=60)


@pytest.fixture
async def client(stack):
    async with sdk(stack) as api:
        yield api


async def until(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_transcription_of_a_wav_file(stack, client):
    with open(FIXTURES / "capital.wav", "rb") as audio:
        result = await client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert "capital" in result.text.lower()


async def test_transcription_of_an_mp3_in_every_response_format(stack, client):
    pcm = read_audio_16k_mono(FIXTURES / "capital.wav")
    encoder = SpeechEncoder("mp3", 16000)
    mp3 = encoder.encode(pcm) + encoder.finish()
    text = await client.audio.transcriptions.create(model="whisper-1", file=("q.mp3", mp3), response_format="text")
    assert "capital" in text.lower()
    verbose = await client.audio.transcriptions.create(model="whisper-1", file=("q.mp3", mp3), response_format="verbose_json")
    assert "capital" in verbose.text.lower()
    assert verbose.duration == pytest.approx(len(pcm) / 32000, abs=0.1)
    srt = await client.audio.transcriptions.create(model="whisper-1", file=("q.mp3", mp3), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and "capital" in srt.lower()


async def test_transcription_refuses_what_is_not_audio(stack, client):
    with pytest.raises(openai.BadRequestError) as refused:
        await client.audio.transcriptions.create(model="whisper-1", file=("notes.wav", b"these are not samples" * 50))
    assert refused.value.body["code"] == "invalid_request" and refused.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as refused:
        with open(FIXTURES / "hello.wav", "rb") as audio:
            await client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="xml")
    assert refused.value.body["param"] == "response_format"
    async with httpx.AsyncClient() as http:  # not multipart at all
        answer = await http.post(f"{stack.http_url}/v1/audio/transcriptions", json={"file": "x"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"
    assert stack.workers["vad_stt"].requests.served == 0  # nothing reached the worker


async def test_speech_as_wav_says_the_text(stack, client, transcriber):
    response = await client.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello there. The weather is lovely today.", response_format="wav"
    )
    with wave.open(io.BytesIO(response.content)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
    pcm = decode_audio(response.content, 16000)
    assert len(pcm) / 32000 > 1.5
    heard = await asyncio.to_thread(transcriber.transcribe, pcm)
    assert "weather" in heard.lower()


async def test_speech_in_the_default_format_and_as_raw_pcm(stack, client):
    mp3 = await client.audio.speech.create(model="tts-1", voice="alloy", input="Good morning.")
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    assert len(decode_audio(mp3.content, 24000)) / 48000 > 0.4
    pcm = await client.audio.speech.create(model="tts-1", voice="alloy", input="Good morning.", response_format="pcm")
    assert len(pcm.content) % 2 == 0 and len(pcm.content) / 48000 > 0.4  # 24 kHz s16le, headerless


async def test_speech_is_streamed_and_a_client_that_leaves_withdraws_it(stack):
    tts = stack.workers["tts"]
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.http_url}/v1/audio/speech", json={"input": LONG_TEXT, "response_format": "pcm"}
        ) as response:
            assert response.status_code == 200
            first = await anext(response.aiter_bytes())
            assert first  # the first sentence arrived while the rest is still being spoken
            assert len(tts.requests) == 1
    await until(lambda: len(tts.requests) == 0 and tts.scheduler.waiting() == 0 and len(stack.gateway.requests) == 0)
    assert tts.requests.cancelled == 1 and tts.requests.served == 0  # withdrawn, not finished


async def test_speech_refuses_bad_bodies(stack, client):
    with pytest.raises(openai.BadRequestError) as refused:
        await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="ogg")
    assert refused.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 5000)
    assert refused.value.body["param"] == "input"
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{stack.http_url}/v1/audio/speech", content=b"[" * 10000)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"
    assert stack.workers["tts"].requests.served == 0


async def test_audio_api_needs_the_client_token_when_tokens_are_set(redis_url, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, client_tokens=["sesame"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with sdk(stack, "wrong") as wrong, sdk(stack, "sesame") as right:
            with pytest.raises(openai.AuthenticationError):
                await wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
            with open(FIXTURES / "hello.wav", "rb") as audio:
                result = await right.audio.transcriptions.create(model="whisper-1", file=audio)
        assert result.text


async def test_no_live_worker_is_stage_unavailable_and_a_dying_one_stage_failed(redis_url, transcriber, voice):
    settings = make_settings(redis_url, worker_ttl_s=1.0)
    async with run_stack(settings, transcriber=transcriber, voice=voice, stages=("vad_stt", "tts")) as stack:
        await until(lambda: stack.gateway.directory.workers["tts"])
        stack.workers["tts"].voice = _Stalled(voice)  # speaks nothing until the worker is gone
        async with sdk(stack) as client:
            speaking = asyncio.create_task(client.audio.speech.create(model="tts-1", voice="alloy", input="Hello."))
            await until(lambda: len(stack.workers["tts"].requests) == 1)
            await _stop_worker(stack, "tts")  # its heartbeat goes with it
            with pytest.raises(openai.APIStatusError) as failed:
                await speaking
            assert failed.value.status_code == 502 and failed.value.body["code"] == "stage_failed"
            with pytest.raises(openai.APIStatusError) as unavailable:
                await client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
        assert unavailable.value.status_code == 503 and unavailable.value.body["code"] == "stage_unavailable"
        assert len(stack.gateway.requests) == 0


class _Stalled:
    """A voice whose synthesis blocks until released (a worker that hangs mid-request)."""

    def __init__(self, voice) -> None:
        import threading

        self.sample_rate = voice.sample_rate
        self.release = threading.Event()

    def synthesize(self, text: str) -> bytes:
        self.release.wait(30)
        return b""


async def _stop_worker(stack, stage: str) -> None:
    """Stop one in-process worker the way its process would end: its tasks end, its heartbeat goes."""
    worker = stack.workers[stage]
    voice = getattr(worker, "voice", None)
    for task in asyncio.all_tasks():
        if task.get_name() == f"test-{stage}":
            task.cancel()
            await asyncio.wait([task], timeout=15)
    if isinstance(voice, _Stalled):
        voice.release.set()  # the abandoned model call ends; its result goes nowhere
