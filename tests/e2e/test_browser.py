"""The browser page in real headless Chromium, with a fake microphone speaking a question."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = Path(__file__).parent.parent / "fixtures" / "capital.wav"

needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


async def launch(playwright, wav: Path):
    return await playwright.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop",
        ],
    )


async def wait_for_event(page, type_: str, timeout_s: float = 60):
    async with asyncio.timeout(timeout_s):
        while True:
            events = await page.evaluate("window.voicepipe.events")
            found = [e for e in events if e["type"] == type_]
            if found:
                return found[0], events
            await asyncio.sleep(0.1)


@needs_browser
async def test_speaking_into_the_page_gets_a_spoken_answer(stack, fake_llm, tmp_path):
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch(playwright, QUESTION)
        try:
            page = await browser.new_page()
            await page.goto(stack.http_url)
            await page.click("#start")
            transcript, _ = await wait_for_event(page, "transcript.final")
            assert "capital" in transcript["text"].lower()
            done, events = await wait_for_event(page, "response.done")
            assert done["text"] == fake_llm.reply
            assert "speech_end_to_first_audio_ms" in done["metrics"]
            assert await page.evaluate("window.voicepipe.audioBytes") > 22050  # over half a second of reply
            log = await page.inner_text("#log")
            assert "capital" in log.lower() and "Eiffel Tower" in log
            await page.screenshot(path=str(tmp_path / "page.png"))
            await page.click("#stop")
        finally:
            await browser.close()


@needs_browser
async def test_typing_into_the_page_without_a_microphone(stack, fake_llm):
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch(playwright, QUESTION)
        try:
            page = await browser.new_page()
            await page.goto(stack.http_url)
            await page.fill("#text", "What is the capital of France?")
            await page.click("#send")
            done, _ = await wait_for_event(page, "response.done")
            assert done["text"] == fake_llm.reply
            assert await page.evaluate("window.voicepipe.audioBytes") > 0
            assert await page.inner_text("#error") == ""
        finally:
            await browser.close()


LONG_REPLY = " ".join(
    [
        "Paris is the capital of France and its largest city by far.",
        "It sits on the river Seine in the north of the country.",
        "The city is known for the Eiffel Tower, which was built for a world fair.",
        "The Louvre holds thousands of paintings, among them the Mona Lisa.",
        "Notre Dame cathedral stands on an island in the middle of the river.",
        "Wide boulevards were cut through the old town in the nineteenth century.",
        "The metro opened in nineteen hundred and still carries millions every day.",
        "Cafes line the streets, and people sit outside even in winter.",
        "Montmartre looks down on the city from its hill in the north.",
        "The Latin Quarter has been home to students for eight hundred years.",
        "Parks such as the Luxembourg Garden are full on sunny afternoons.",
        "Many visitors say a week is not enough to see it all.",
    ]
)
QUANTUM = 128  # frames the audio thread renders per process call


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
        state = await page.evaluate(
            "({state: voicepipe.state, played: voicepipe.playedSamples, queued: voicepipe.queuedSamples,"
            " flushes: voicepipe.flushes, events: voicepipe.events.map(e => e.type).slice(-8)})"
        )
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}; page: {state}")


@needs_browser
async def test_stopping_a_reply_flushes_the_buffered_audio_within_one_quantum(stack, fake_llm, tmp_path):
    """The reply's audio reaches the page faster than real time, so seconds of it sit in the playback
    worklet's queue. Stop reply -> response.cancel -> response.interrupted: the worklet drops its queue on
    the next render quantum and plays nothing of it afterwards, measured by the worklet's own counters."""
    from playwright.async_api import async_playwright

    fake_llm.reply = LONG_REPLY
    fake_llm.token_delay_s = 0.05  # ~7 s of generation: the turn is still live on the server when we click
    async with async_playwright() as playwright:
        browser = await launch(playwright, QUESTION)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(stack.http_url)
            await page.fill("#text", "Tell me about Paris.")
            await page.click("#send")

            rate = await wait_for(page, "voicepipe.contextSampleRate", "the AudioContext")
            # Playing, with a good deal more than one quantum buffered behind the playhead.
            await wait_for(
                page,
                "voicepipe.playedSamples > 0 && voicepipe.queuedSamples > voicepipe.contextSampleRate / 4",
                "the worklet to play and buffer a quarter second of reply audio",
                timeout_s=60,
            )
            assert await page.inner_text("#status") == "speaking"
            types = [e["type"] for e in await page.evaluate("voicepipe.events")]
            assert "response.done" not in types, "the reply finished before the test could stop it"

            await page.click("#cancel")
            interrupted, _ = await wait_for_event(page, "response.interrupted", timeout_s=10)
            assert interrupted["reason"] == "cancelled"
            # The worklet's flush record, once it has rendered 0.3 s worth of quanta since the flush.
            after = int(0.3 * rate)
            flush = await wait_for(
                page,
                "voicepipe.flushes.find((f) => f.reason === 'interrupted:cancelled'"
                f" && f.framesAfterFlush >= {after})",
                "the worklet to report its flush and 0.3 s of rendering after it",
                timeout_s=10,
            )
            assert flush["queuedAtFlush"] > QUANTUM, flush  # there really was audio to drop
            assert flush["playedAfterFlush"] <= QUANTUM, flush  # silent within one quantum
            assert await page.evaluate("voicepipe.queuedSamples") == 0

            assert await page.inner_text("#status") != "speaking"
            bubble = page.locator(".msg.bot.cut")
            assert await bubble.count() == 1
            note = await bubble.locator(".note.cut").inner_text()
            assert "Stopped" in note and "cancelled" in note
            assert await bubble.get_attribute("data-interrupted") == "cancelled"
            assert await page.is_disabled("#cancel")
            assert await page.inner_text("#error") == ""
            assert errors == []
            await page.screenshot(path=str(tmp_path / "interrupted.png"))
        finally:
            await browser.close()


@needs_browser
async def test_the_page_sends_its_token_as_a_subprotocol(redis_url, redis_client, transcriber, voice, fake_llm):
    """`/?token=T` with client tokens on: the page offers `voicepipe.v1` and `token.T`, the gateway
    answers `voicepipe.v1`, and the token never appears in the WebSocket URL (nor in server logs)."""
    from playwright.async_api import async_playwright

    from tests.conftest import make_settings
    from tests.support.stack import run_stack

    settings = make_settings(redis_url, client_tokens=["page-token-1"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with async_playwright() as playwright:
            browser = await launch(playwright, QUESTION)
            try:
                page = await browser.new_page()
                sockets: list[str] = []
                page.on("websocket", lambda ws: sockets.append(ws.url))
                await page.goto(f"{stack.http_url}/?token=page-token-1")
                await page.fill("#text", "What is the capital of France?")
                await page.click("#send")
                done, _ = await wait_for_event(page, "response.done")
                assert done["text"] == fake_llm.reply
                assert await page.evaluate("window.voicepipe.protocol") == "voicepipe.v1"
                assert sockets and all("token" not in url for url in sockets), sockets
                assert await page.inner_text("#error") == ""
            finally:
                await browser.close()
        assert stack.gateway.stats.rejected == 0
