"""Replies in slices against the real embedded LLM server (SmolLM2) at temperature 0: the
client-side ChatML prompt is the model's own chat template, and a reply cut and continued while
another conversation's reply takes the server goes on from where it stopped.

Run it under `flock /tmp/bench.lock` on a shared machine (it runs the real model)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.support.llm_server import llm_server
from workers.llm_orchestrator.llm_client import ChatClient
from workers.llm_orchestrator.scheduler import GenerationScheduler
from workers.llm_orchestrator.slices import SlicedChat

pytestmark = pytest.mark.e2e

SYSTEM = "You are a helpful voice assistant. Answer in one or two short spoken sentences, without lists or markdown."


def conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def llm_base_url(tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("llm") / "llm.log") as root:
        yield f"{root}/v1"


async def reply(chat, question: str) -> str:
    async with contextlib.aclosing(chat.stream_chat(conversation(question))) as stream:
        return "".join([delta async for delta in stream])


async def test_the_chatml_prompt_is_the_models_chat_template(llm_base_url):
    """A reply in one slice (a completions request on the ChatML prompt) is the chat API's reply."""
    client = ChatClient(llm_base_url, "smollm2", temperature=0, max_tokens=60)
    try:
        chat = SlicedChat(client, first_slice_tokens=60)
        for question in ("What is the capital of France?", "Why is the sky blue?"):
            assert await reply(chat, question) == await reply(client, question)
        assert chat.scheduler.preemptions == 0 and [g.rank for g in chat.scheduler.granted] == [0, 0]
    finally:
        await client.aclose()


async def test_replies_cut_and_continued_while_another_reply_takes_the_server_stay_coherent(llm_base_url):
    client = ChatClient(llm_base_url, "smollm2", temperature=0, max_tokens=60)
    try:
        whole = {q: await reply(client, q) for q in ("Tell me about elephants.", "Tell me about the sea.")}
        scheduler = GenerationScheduler()
        chat = SlicedChat(client, scheduler, first_slice_tokens=4, slice_tokens=6)  # cut often on purpose
        sliced = dict(zip(whole, await asyncio.gather(*(reply(chat, q) for q in whole))))
        labels = [g.label for g in scheduler.granted]
        switches = sum(a != b for a, b in zip(labels, labels[1:]))
        assert len(set(labels)) == 2 and switches >= 4  # cut and continued in turns, several times
        for question, text in sliced.items():
            assert "<|im" not in text and "assistant\n" not in text  # never ran into a new turn
            # the first slice is the unsliced reply's start, word for word
            assert whole[question].split()[:3] == text.split()[:3]
            # continued, not restarted: the words after the first cut are not the opening again
            words = text.split()
            assert len(words) > 8 and words[3:6] != words[:3], text
            # A continuation may still word things differently from one uninterrupted request, even
            # with nothing in between: the text so far is tokenized to the same tokens, but
            # evaluated again as a batch, whose floating-point results can tip a close choice.
    finally:
        await client.aclose()
