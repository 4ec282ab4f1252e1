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
from voicepipe.wavio import read_audio_16k_mono

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


def test_talk_refuses_a_file_that_is_not_audio(tmp_path):
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio")
    result = subprocess.run([*VOICEPIPE, "talk", str(bogus)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not audio in a format that can be decoded" in result.stderr and "Traceback" not in result.stderr


def test_up_fully_embedded_answers_a_spoken_question(tmp_path):
    """No Redis URL and no LLM URL: embedded redis-server and the SmolLM2 model serve the turn."""
    up = Up(stack_env(), tmp_path / "up.log")
    try:
        up.wait_ready(240)
        children = up.descendants()
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert "redis-server" in names and "voicepipe.llm_server" in names

        async def speak():
            async with VoiceClient(f"ws://127.0.0.1:{up.port}/v1/ws") as client:
                sender = asyncio.create_task(client.send_speech(read_audio_16k_mono(FIXTURES / "moon.wav"), realtime=False))
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
    # a quiet console: voicepipe's own lines up to the ready banner, the embedded services in files
    console = up.log_path.read_text()
    before, banner, after = console.partition("voicepipe is ready")
    assert banner, console[-3000:]
    assert len(before.splitlines()) <= 60, before
    assert "llama_model_loader" not in console and "llm_load" not in console and "load_tensors" not in console
    run_dir = Path(re.search(r"the embedded services to (\S+)", after).group(1))
    assert (run_dir / "redis.log").exists()
    llm_log = (run_dir / "llm-server.log").read_text()
    assert "voicepipe.llm_server serving" in llm_log  # the LLM server's own output went here


def test_sigterm_with_50_open_sockets_cleans_everything_and_says_so(redis_url, tmp_path):
    import json

    import redis as redis_sync
    import websockets

    env = stack_env(VOICEPIPE_REDIS_URL=redis_url)
    ns, channel = env["VOICEPIPE_NAMESPACE"], env["VOICEPIPE_CONNECTION_EVENTS_CHANNEL"]
    with FakeLlmServer(FakeLlm()) as llm:
        env["VOICEPIPE_LLM_BASE_URL"] = llm.base_url
        up = Up(env, tmp_path / "up.log")
        events = redis_sync.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        events.subscribe(channel)
        try:
            up.wait_ready(120)

            async def hold_50_then_stop() -> tuple[list[int], set[str]]:
                sockets = [await websockets.connect(f"ws://127.0.0.1:{up.port}/v1/ws") for _ in range(50)]
                ids = {json.loads(await ws.recv())["conversation_id"] for ws in sockets}
                up.process.send_signal(signal.SIGTERM)
                codes = []
                for ws in sockets:
                    try:
                        async with asyncio.timeout(30):
                            async for _ in ws:
                                pass
                    except websockets.ConnectionClosed:
                        pass
                    codes.append(ws.close_code)
                return codes, ids

            codes, ids = asyncio.run(hold_50_then_stop())
            assert codes == [1001] * 50
            assert up.process.wait(60) == 0
            heard: dict[str, dict] = {}
            deadline = time.monotonic() + 10
            while len(heard) < 50 and time.monotonic() < deadline:
                message = events.get_message(timeout=1)
                if message is not None:
                    event = json.loads(message["data"])
                    heard[event["conversation_id"]] = event
            assert set(heard) == ids
            assert all(e["reason"] == "server_error" and e.get("detail") == "shutdown" for e in heard.values())
        finally:
            up.stop()
            events.close()
    log = up.log_path.read_text()
    lines = re.findall(r"Shutdown cleanup completed: .*", log)
    gateway_line = [line for line in lines if "connections" in line]
    assert len(gateway_line) == 1, lines
    assert re.fullmatch(
        r"Shutdown cleanup completed: cleaned=50 connections, iterations=1, before=50, after=0, "
        r"duration=\d+(\.\d+)?ms, max_iterations_reached=False",
        gateway_line[0],
    ), gateway_line
    workers = [line for line in lines if "worker=" in line]
    assert {re.search(r"worker=(\w+?)-", line).group(1) for line in workers} == {"vad_stt", "llm", "tts"}
    assert all("remaining=0" in line for line in workers)
    client = redis_sync.Redis.from_url(redis_url)
    left = [k.decode() for k in client.scan_iter(match=f"{ns}:*")]
    client.close()
    assert all(k.endswith(":history") for k in left if f"{ns}:conv:" in k), left
    assert not [k for k in left if f"{ns}:conv:" not in k and not k.startswith(f"{ns}:workers:")], left
