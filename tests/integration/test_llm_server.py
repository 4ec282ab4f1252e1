"""voicepipe's LLM server (voicepipe/llm_server) as a real process on a real socket, with the
bundled SmolLM2: a conversation's next request reuses its KV sequence even after other
conversations' requests, requests in flight advance together, a client that leaves frees its
sequence, and bad requests get clear errors. Clients: httpx and the OpenAI SDK."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.support.llm_server import llm_server

SYSTEM = "You are a helpful voice assistant. Answer in one or two short spoken sentences."
COUNTING = "<|im_start|>user\nCount from one to one hundred in digits, separated by commas.<|im_end|>\n<|im_start|>assistant\n1, 2, 3,"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("llm") / "llm.log", "--sequences", "3", "--ctx", "512") as root:
        yield root


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        yield client


async def chat(http, messages, **extra):
    response = await http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 24, **extra})
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_conversations_next_turn_reuses_its_cache_after_other_conversations(http):
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
    b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a large animal."}]
    c = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}]
    first = await chat(http, a)
    # two other conversations in between (the server holds three): with one KV cache they would
    # have evicted a's state
    await chat(http, b)
    await chat(http, c)
    answer = first["choices"][0]["message"]["content"]
    assert answer
    a += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Spain?"}]
    second = await chat(http, a)
    usage = second["usage"]
    # everything up to the first reply's end was cached: only the new user turn is evaluated
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] + 1
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 20
    assert second["choices"][0]["message"]["content"]


async def stream_completion(http, prompt, max_tokens, arrivals, name, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    text, finish = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"]:
                text.append(choice["text"])
                arrivals.append(name)
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


async def test_requests_in_flight_advance_together(http):
    arrivals: list[str] = []
    long = asyncio.create_task(stream_completion(http, COUNTING, 120, arrivals, "long"))
    while "long" not in arrivals:  # the long one is generating...
        await asyncio.sleep(0.01)
    short_text, short_finish = await stream_completion(http, COUNTING.replace("one hundred", "ten"), 6, arrivals, "short")
    long_text, long_finish = await long
    assert short_finish == "length" and short_text
    assert long_finish == "length" and " 10," in long_text
    # ... and the short one, sent meanwhile, was served beside it, not after its whole reply
    assert arrivals[-1] == "long" and arrivals.index("short") < len(arrivals) - 6


async def test_more_requests_than_sequences_wait_their_turn_and_all_finish(http):
    arrivals: list[str] = []
    results = await asyncio.gather(*(stream_completion(http, COUNTING, 12, arrivals, str(i)) for i in range(7)))
    assert [finish for _, finish in results] == ["length"] * 7
    assert all(text.startswith(" 4") for text, _ in results)


async def test_a_client_that_leaves_mid_stream_frees_its_sequence(http):
    body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break  # leaving the block closes the connection mid-reply
    deadline = time.monotonic() + 30
    while (health := (await http.get("/health")).json())["requests_in_flight"]:
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.05)
    # the sequence kept what it evaluated: the same prompt again is served from its cache
    again = (await http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["choices"][0]["text"].startswith(" 4")


async def test_stop_strings_end_the_reply_and_are_not_sent(http):
    arrivals: list[str] = []
    text, finish = await stream_completion(http, COUNTING, 60, arrivals, "s", stop=[" 7,"])
    assert finish == "stop" and text.rstrip().endswith("6,") and "7" not in text


async def test_bad_requests_get_clear_errors_and_the_server_goes_on(http):
    too_long = await http.post("/v1/completions", json={"prompt": "word " * 2000, "max_tokens": 4})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    assert (await http.post("/v1/completions", json={"max_tokens": 4})).status_code == 422
    assert (await http.post("/v1/chat/completions", json={"messages": []})).status_code == 422
    assert (await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})).status_code == 422
    assert (await http.post("/v1/completions", json={"prompt": "Hi", "temperature": -1})).status_code == 422
    nothing = (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})).json()
    assert nothing["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    assert (await chat(http, [{"role": "user", "content": "Say hello."}]))["choices"][0]["message"]["content"]


async def test_the_openai_sdk_streams_a_chat_reply_with_usage(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["smollm2"]
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is two plus two?"}], max_tokens=20,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
        content, finishes, usage = [], [], None
        async for chunk in stream:
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                finishes.append(choice.finish_reason)
            usage = chunk.usage or usage
        assert "".join(content).strip() and finishes[-1] in ("stop", "length")
        assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 10
    finally:
        await client.close()
