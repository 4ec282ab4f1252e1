"""`voicepipe up` fails fast: a child that dies during startup stops the stack at once, with its
name and last lines; and the embedded LLM server lets concurrent streaming requests finish."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import httpx
import pytest

from tests.e2e.test_processes import VOICEPIPE, stack_env
from tests.support.llm_server import llm_server
from voicepipe.embedded import free_port

pytestmark = pytest.mark.e2e
BOUND_S = 120  # generous: the failing child is noticed when it exits, not at a readiness timeout


def _up_until_exit(env: dict[str, str], port: int, timeout: float = BOUND_S) -> tuple[int, str]:
    result = subprocess.run(
        [*VOICEPIPE, "up", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )
    return result.returncode, result.stdout


def test_up_with_the_gateway_port_taken_exits_with_the_gateways_last_lines(redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = stack_env(VOICEPIPE_REDIS_URL=redis_url, VOICEPIPE_LLM_BASE_URL="http://127.0.0.1:9/v1")
        code, output = _up_until_exit(env, port)
    assert code == 1, output
    assert "gateway exited with code" in output and "during startup" in output, output
    report = output[output.index("gateway exited with code"):]
    assert "address already in use" in report.lower(), output  # uvicorn's own line, from the ring buffer
    assert "  | " in report
    assert "voicepipe is ready" not in output
    assert "all processes stopped" in output


def test_up_with_a_worker_that_cannot_load_its_model_exits_with_its_last_lines(redis_url, tmp_path):
    """The orchestrator does not call the LLM before the first turn, so a bad LLM URL is no startup
    failure; a speech-to-text model that cannot load is: the vad_stt worker exits during startup."""
    env = stack_env(
        VOICEPIPE_REDIS_URL=redis_url,
        VOICEPIPE_LLM_BASE_URL="http://127.0.0.1:9/v1",
        VOICEPIPE_STT_MODEL_PATH=str(tmp_path / "no-such-model"),
    )
    started = time.monotonic()
    code, output = _up_until_exit(env, free_port())
    elapsed = time.monotonic() - started
    assert code == 1, output
    assert "worker-vad_stt exited with code" in output and "during startup" in output, output
    report = output[output.index("worker-vad_stt exited with code"):]
    assert "no-such-model" in report, output  # the worker's traceback names the missing model
    assert "voicepipe is ready" not in output
    assert elapsed < 170, elapsed  # it did not wait out the pipeline's 180 s readiness timeout


def test_embedded_llm_server_lets_two_concurrent_streams_finish(tmp_path):
    """A second request arriving while the first streams is served beside it, neither cut."""
    with llm_server(tmp_path / "llm.log") as root:
        base = f"{root}/v1"

        async def stream(client: httpx.AsyncClient, question: str) -> tuple[str, str]:
            body = {
                "model": "smollm2", "stream": True, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": question}],
            }
            text, last = [], ""
            async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    last = line[len("data: "):].strip()
                    if last != "[DONE]":
                        import json

                        for choice in json.loads(last).get("choices", []):
                            text.append((choice.get("delta") or {}).get("content") or "")
            return "".join(text), last

        async def both():
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(stream(client, "Tell me about the moon."))
                await asyncio.sleep(0.3)  # the first is streaming when the second arrives
                second = asyncio.create_task(stream(client, "Tell me about the sea."))
                return await asyncio.gather(first, second)

        (text1, last1), (text2, last2) = asyncio.run(both())
        assert last1 == "[DONE]" and last2 == "[DONE]"
        assert text1.strip() and text2.strip()

