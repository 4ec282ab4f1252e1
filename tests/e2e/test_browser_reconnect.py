"""The browser page keeps its conversation through a gateway restart: real headless Chromium, a real
gateway process stopped and started again on the same port, the workers running throughout.

The page reconnects with the conversation's latest `resume_token` (it rotates on every resume), shows
"reconnecting…" meanwhile, keeps the transcript on screen, and the next turn knows the earlier ones.
A conversation the server can no longer resume (close 4404) is replaced by a new one, and the page
says so."""
from __future__ import annotations

import asyncio

import pytest

from shared.channels import Names
from tests.e2e.test_browser import QUESTION, launch, needs_browser
from tests.e2e.test_edge_processes import GatewayProcess, gateway_env
from tests.support.stack import run_stack
from voicepipe.embedded import free_port

pytestmark = pytest.mark.e2e


async def wait_for(page, expression: str, what: str, timeout_s: float = 30):
    """Poll a page expression until it is truthy; return its value. Fails with the page's state."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                value = await page.evaluate(expression)
                if value:
                    return value
                await asyncio.sleep(0.05)
    except TimeoutError:
        state = await page.evaluate("({state: voicepipe.state, events: voicepipe.events.map(e => e.type).slice(-8)})")
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}; page: {state}")


def sessions(page):
    return page.evaluate("voicepipe.events.filter(e => e.type === 'session.started')")


async def typed_turn(page, text: str, turns_before: int) -> dict:
    """Type `text`, wait for its response.done (the `turns_before + 1`-th); return it."""
    await page.fill("#text", text)
    await page.click("#send")
    return await wait_for(
        page,
        f"voicepipe.events.filter(e => e.type === 'response.done')[{turns_before}]",
        f"the reply to {text!r}",
    )


@pytest.fixture
async def workers(settings, redis_client, transcriber, voice, fake_llm):
    """The three workers (their in-process gateway is not used); the page talks to gateway processes."""
    fake_llm.echo = True  # "You said X. I remember N earlier questions.": the history, seen from the LLM
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        yield stack


def start_gateway(settings, port: int, tmp_path, n: int) -> GatewayProcess:
    env = gateway_env(settings.redis_url, settings.namespace)
    return GatewayProcess(env, tmp_path / f"gateway-{n}.log", port=port)


@needs_browser
async def test_the_page_resumes_its_conversation_after_a_gateway_restart(workers, tmp_path):
    from playwright.async_api import async_playwright

    port = free_port()
    gateway = start_gateway(workers.settings, port, tmp_path, 1)
    try:
        await gateway.wait_ready()
        async with async_playwright() as playwright:
            browser = await launch(playwright, QUESTION)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"http://127.0.0.1:{port}")
                first = await typed_turn(page, "What is the capital of France?", 0)
                assert first["text"] == "You said What is the capital of France?. I remember 0 earlier questions."
                [started] = await sessions(page)
                assert started["resumed"] is False

                # SIGTERM: sockets closed with 1001, the port is free (waited for off the loop: the
                # in-process workers keep their heartbeats)
                assert await asyncio.to_thread(gateway.stopped_cleanly)
                await wait_for(page, "voicepipe.state === 'reconnecting…'", "the reconnecting state")
                assert await page.inner_text("#status") == "reconnecting…"
                assert "connection lost" in await page.inner_text("#log")

                gateway = start_gateway(workers.settings, port, tmp_path, 2)
                await wait_for(page, "voicepipe.reconnects === 1", "the page to resume", timeout_s=60)
                resumed = (await sessions(page))[-1]
                assert resumed["resumed"] is True
                assert resumed["conversation_id"] == started["conversation_id"]
                assert resumed["resume_token"] != started["resume_token"]  # rotated
                assert await page.inner_text("#status") != "reconnecting…"

                log = await page.inner_text("#log")
                assert "What is the capital of France?" in log and "I remember 0 earlier questions" in log
                second = await typed_turn(page, "And of Spain?", 1)
                assert second["text"] == "You said And of Spain?. I remember 1 earlier questions."
                assert await page.inner_text("#error") == ""
                assert errors == []
                await page.screenshot(path=str(tmp_path / "resumed.png"))
            finally:
                await browser.close()
    finally:
        await asyncio.to_thread(gateway.stop)


@needs_browser
async def test_a_conversation_that_cannot_be_resumed_is_replaced_by_a_new_one(workers, redis_client, tmp_path):
    """The conversation's history and token are gone (as after the resume window): the resume is
    refused with 4404, and the page opens a new conversation at once and says so."""
    from playwright.async_api import async_playwright

    port = free_port()
    gateway = start_gateway(workers.settings, port, tmp_path, 1)
    try:
        await gateway.wait_ready()
        async with async_playwright() as playwright:
            browser = await launch(playwright, QUESTION)
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{port}")
                await typed_turn(page, "Hello there", 0)
                [started] = await sessions(page)

                assert await asyncio.to_thread(gateway.stopped_cleanly)
                await wait_for(page, "voicepipe.state === 'reconnecting…'", "the reconnecting state")
                await redis_client.delete(Names.from_settings(workers.settings).history(started["conversation_id"]))

                gateway = start_gateway(workers.settings, port, tmp_path, 2)
                await wait_for(page, "voicepipe.events.filter(e => e.type === 'session.started').length === 2",
                               "a new session", timeout_s=60)
                fresh = (await sessions(page))[-1]
                assert fresh["resumed"] is False and fresh["conversation_id"] != started["conversation_id"]
                codes = await page.evaluate("voicepipe.events.filter(e => e.type === 'error').map(e => e.code)")
                assert codes == ["unknown_conversation"]
                log = await page.inner_text("#log")
                assert "could not be resumed" in log and "starting a new conversation" in log
                assert "Hello there" in log  # the old transcript stays on screen
                reply = await typed_turn(page, "Who am I?", 1)
                assert reply["text"] == "You said Who am I?. I remember 0 earlier questions."
                assert await page.evaluate("voicepipe.reconnects") == 0
            finally:
                await browser.close()
    finally:
        await asyncio.to_thread(gateway.stop)
