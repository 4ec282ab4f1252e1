"""The deployed shape: `voicepipe up` runs every stage as its own process, joined only by Redis."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.client import VoiceClient
from voicepipe.embedded import free_port
from voicepipe.wavio import read_wav_16k_mono

pytestmark = pytest.mark.e2e
FIXTURES = Path(__file__).parent.parent / "fixtures"
VOICEPIPE = [sys.executable, "-m", "voicepipe"]


def stack_env(**extra: str) -> dict[str, str]:
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    env.update(
        VOICEPIPE_NAMESPACE=ns,
        VOICEPIPE_CONNECTION_EVENTS_CHANNEL=f"{ns}:connection_events",
        VOICEPIPE_TTS_CONTROL_CHANNEL=f"{ns}:tts_control",
        VOICEPIPE_STT_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Up:
    """`voicepipe up` as a child process with its combined log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [*VOICEPIPE, "up", "--port", str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"stack not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()


def _assert_all_gone(processes: list[psutil.Process]) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_up_and_talk_with_every_stage_in_its_own_process(redis_url, tmp_path):
    with FakeLlmServer(FakeLlm()) as llm:
        up = Up(stack_env(VOICEPIPE_REDIS_URL=redis_url, VOICEPIPE_LLM_BASE_URL=llm.base_url), tmp_path / "up.log")
        try:
            up.wait_ready(120)
            children = up.descendants()
            assert {" ".join(p.cmdline()[-2:]) for p in children} >= {"worker vad_stt", "worker llm", "worker tts"}
            reply_path = tmp_path / "reply.wav"
            talk = subprocess.run(
                [*VOICEPIPE, "talk", str(FIXTURES / "capital.wav"), "--url", f"ws://127.0.0.1:{up.port}/v1/ws",
                 "--out", str(reply_path), "--timeout", "60"],
                capture_output=True, text=True, timeout=90, env=stack_env(),
            )
            assert talk.returncode == 0, talk.stderr
            assert re.search(r"you said: .*capital", talk.stdout, re.I), talk.stdout
            assert f"assistant: {llm.reply}" in talk.stdout
            assert "speech_end_to_first_audio_ms" in talk.stdout
            assert reply_path.stat().st_size > 22050 * 2  # over a second of reply audio
        finally:
            code = up.stop()
        assert code == 0
        _assert_all_gone(children)
    log = up.log_path.read_text()
    correlation_ids = set(re.findall(r"\[cid=([0-9a-f-]{36}) conv=", log))
    assert correlation_ids, "no conversation was logged"
    for cid in correlation_ids:  # one grep shows the conversation in every process
        processes = {line.split()[3] for line in log.splitlines() if f"cid={cid}" in line}
        assert processes >= {"gateway", "vad_stt", "llm", "tts"}, processes


def test_talk_refuses_a_file_that_is_not_a_wav(tmp_path):
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio")
    result = subprocess.run([*VOICEPIPE, "talk", str(bogus)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not a PCM WAV file" in result.stderr and "Traceback" not in result.stderr


def test_up_fully_embedded_answers_a_spoken_question(tmp_path):
    """No Redis URL and no LLM URL: embedded redis-server and the SmolLM2 model serve the turn."""
    up = Up(stack_env(), tmp_path / "up.log")
    try:
        up.wait_ready(240)
        children = up.descendants()
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert "redis-server" in names and "llama_cpp.server" in names

        async def speak():
            async with VoiceClient(f"ws://127.0.0.1:{up.port}/v1/ws") as client:
                sender = asyncio.create_task(client.send_speech(read_wav_16k_mono(FIXTURES / "moon.wav"), realtime=False))
                turn = await client.receive_turn(timeout=120)
                await sender
                return turn

        turn = asyncio.run(speak())
        assert "moon" in turn.transcript.lower()
        assert turn.done is not None and turn.done["text"].strip()
        assert len(turn.audio) > 0
        assert {"speech_end_to_first_audio_ms", "stt_ms", "llm_ms", "tts_ms"} <= set(turn.done["metrics"])
    finally:
        code = up.stop(signal.SIGTERM)
    assert code == 0
    _assert_all_gone(children)
