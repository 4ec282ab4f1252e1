"""`voicepipe simulate-disconnects` against a running stack: a clean report, and it does catch leaks."""
from __future__ import annotations

import argparse

from tests.conftest import make_settings
from tests.support.stack import run_stack
from voicepipe import simulate


def simulate_args(stack, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args(["--url", stack.http_url, "--api-key", "test-admin-key", "--settle", "0.5"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


async def test_every_phase_and_way_is_clean(redis_url, redis_client, transcriber, voice, fake_llm, capsys):
    settings = make_settings(redis_url, ping_interval_s=0.5, ping_timeout_s=0.5)
    fake_llm.token_delay_s = 0.03
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        code = await simulate.simulate(simulate_args(stack, cleanup_timeout=10.0), settings)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RESULT: OK (12 disconnects)" in out
    for phase in simulate.PHASES:
        for way in simulate.WAYS:
            assert f"{phase:13} {way:7}     1" in out


async def test_churn_leaves_every_worker_empty(redis_url, redis_client, transcriber, voice, fake_llm, capsys):
    settings = make_settings(redis_url)
    fake_llm.reply = "Okay."
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        code = await simulate.simulate(simulate_args(stack, churn=60, concurrency=10, cleanup_timeout=10.0), settings)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "churn: 60 cycles" in out and "RESULT: OK" in out


async def test_a_leak_is_reported_and_fails_the_run(redis_url, redis_client, transcriber, voice, fake_llm, capsys):
    """A TTS worker that forgets to clean must turn the report red."""
    settings = make_settings(redis_url)
    fake_llm.token_delay_s = 0.03
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        tts = stack.workers["tts"]

        async def forgetful(conversation_id: str) -> None:
            return None

        tts.close_conversation = forgetful
        args = simulate_args(stack, phases="speaking", ways="close", cleanup_timeout=1.0)
        code = await simulate.simulate(args, settings)
    out = capsys.readouterr().out
    assert code == 1
    assert "LEAK speaking/close" in out and "tts holds" in out and "RESULT: FAIL" in out
