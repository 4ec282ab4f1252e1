"""The LLM server alone: voicepipe's own server (voicepipe/llm_server) against llama-cpp-python's,
on the bundled SmolLM2, with the orchestrator's system prompt and ChatML completions at
temperature 0, as the orchestrator sends them.

    python -m bench.llm_server [--conversations 4] [--turns 6] [--tokens 24] [--env GOMP_SPINCOUNT=300000]

Three loads, each on a fresh server, one server at a time:
- alone: one conversation, turn after turn;
- taking turns: the conversations' turns one request at a time, round-robin (as replies in slices
  go to a one-at-a-time server): each turn follows another conversation's;
- at once: every conversation's turns in parallel (each conversation's turns in order).
Printed per load: time to first token (p50 / p95 / max), the time per generated token after the
first, prompt tokens evaluated (not found in a cache), the wall time of the load and the CPU time
the server used for it (its threads, busy or waiting on a spin).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import httpx
import psutil

from bench.stack import launch, percentile
from shared.config import Settings
from voicepipe import embedded
from workers.llm_orchestrator import chatml

QUESTIONS = [
    "What is the capital of France?", "Tell me a fun fact about the moon.", "How far away is the sun?",
    "What should I cook for dinner tonight?", "Why is the sky blue?", "Can you recommend a good book?",
    "What is the tallest mountain?", "How do plants make food?", "What is your favourite colour?",
    "Why do cats purr?", "How many legs does a spider have?", "What is the speed of light?",
]


def llama_cpp_argv(port: int, threads: int) -> list[str]:
    """llama-cpp-python's server as `voicepipe up` ran it before (embedded.llm_argv at 8a93542)."""
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", embedded.smollm2_path(), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
        "--interrupt_requests", "false",
    ]


@dataclass
class Load:
    ttft_ms: list[float] = field(default_factory=list)
    per_token_ms: list[float] = field(default_factory=list)
    evaluated: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


async def turn(client: httpx.AsyncClient, messages: list[dict[str, str]], tokens: int, load: Load) -> str:
    body = {"prompt": chatml.prompt(messages), "max_tokens": tokens, "temperature": 0, "stream": True,
            "stop": chatml.STOP, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    count = 0
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage")
            if usage:
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                load.evaluated += usage["prompt_tokens"] - cached
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    count += 1
                    text.append(choice["text"])
    if first is not None:
        load.ttft_ms.append((first - sent) * 1000)
        if count > 1 and last is not None:
            load.per_token_ms.append((last - first) * 1000 / (count - 1))
    return "".join(text)


async def run_load(base: str, kind: str, conversations: int, turns: int, tokens: int, system: str) -> Load:
    load = Load()
    chats = [[{"role": "system", "content": system}] for _ in range(conversations if kind != "alone" else 1)]
    questions = iter(QUESTIONS * (turns * conversations))

    async def one(chat: list[dict[str, str]], client: httpx.AsyncClient) -> None:
        chat.append({"role": "user", "content": next(questions)})
        chat.append({"role": "assistant", "content": (await turn(client, chat, tokens, load)).strip()})

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        if kind == "alone":
            for _ in range(turns):
                await one(chats[0], client)
        elif kind == "taking turns":
            for _ in range(turns):
                for chat in chats:
                    await one(chat, client)
        else:
            async def conversation(chat: list[dict[str, str]]) -> None:
                for _ in range(turns):
                    await one(chat, client)

            await asyncio.gather(*(conversation(chat) for chat in chats))
    load.wall_s = time.perf_counter() - started
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per reply (about a spoken sentence)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 2))
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="also run voicepipe's server with this environment variable (repeatable, one variant each)")
    args = parser.parse_args()
    system = Settings(_env_file=None).system_prompt
    servers = {
        "llama-cpp-python": (lambda port: llama_cpp_argv(port, args.threads), {}),
        "voicepipe": (lambda port: embedded.llm_argv(port, threads=args.threads), {}),
    }
    for assignment in args.env:
        key, _, value = assignment.partition("=")
        servers[f"voicepipe {key}={value}"] = (servers["voicepipe"][0], {key: value})
    print(f"{'server':28} {'load':13} {'ttft p50':>9} {'p95':>6} {'max':>6} {'ms/token':>9} {'evaluated':>10} {'wall s':>7} {'cpu s':>6}")
    for kind in ("alone", "taking turns", "at once"):
        for name, (argv, env) in servers.items():
            port = embedded.free_port()
            process, _ = launch(argv(port), f"http://127.0.0.1:{port}/v1/models", "llm", env)
            try:
                base = f"http://127.0.0.1:{port}"
                asyncio.run(run_load(base, "alone", 1, 1, 4, system))  # warm-up
                server = psutil.Process(process.pid)
                before = sum(server.cpu_times()[:2])
                load = asyncio.run(run_load(base, kind, args.conversations, args.turns, args.tokens, system))
                load.cpu_s = sum(server.cpu_times()[:2]) - before
            finally:
                process.terminate()
                process.wait(30)
            t = load.ttft_ms
            print(
                f"{name:28} {kind:13} {percentile(t, 50):9.0f} {percentile(t, 95):6.0f} {max(t):6.0f} "
                f"{percentile(load.per_token_ms, 50):9.1f} {load.evaluated if load.evaluated else '-':>10} {load.wall_s:7.1f} "
                f"{load.cpu_s:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
