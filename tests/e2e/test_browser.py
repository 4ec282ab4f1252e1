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
