"""The models' CPU priority as each worker loads them, read back from the kernel in a fresh process
(a model library's threads inherit the policy of the thread that loaded it, and OpenMP reads its
wait policy once, when it loads): whisper's threads are niced but never SCHED_IDLE, piper's are
SCHED_IDLE, and whisper's OpenMP threads spin only briefly before they sleep (shared/priority.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.priority import OPENMP_SPIN_COUNT

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")

PROBE = """
import asyncio, json, os, sys
from shared.bus import create_redis
from shared.config import Settings

stage = sys.argv[1]
settings = Settings(redis_url="redis://127.0.0.1:1/0")  # never connected: loading needs no Redis
if stage == "vad_stt":
    from workers.vad_stt.handler import VadSttWorker as W
else:
    from workers.tts.handler import TtsWorker as W
worker = W(settings, create_redis(settings.redis_url))
asyncio.run(worker.load())
threads = []
for tid in map(int, os.listdir("/proc/self/task")):
    try:
        threads.append({"policy": os.sched_getscheduler(tid), "nice": os.getpriority(os.PRIO_PROCESS, tid)})
    except OSError:
        pass  # a thread that ended meanwhile
print(json.dumps({"threads": threads, "omp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}))
"""


def probe(stage: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_") and k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, stage], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def model_threads(found: dict) -> list[dict]:
    """The threads at the inference nice value: the loading thread and the model's own."""
    return [t for t in found["threads"] if t["nice"] == 10]


def test_whisper_threads_are_niced_but_not_idle_and_its_openmp_spins_briefly():
    found = probe("vad_stt")
    assert len(model_threads(found)) >= 2  # the loading thread and whisper's own (STT_THREADS=2)
    assert all(t["policy"] != os.SCHED_IDLE for t in found["threads"])
    assert found["omp"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}


def test_piper_threads_are_idle():
    found = probe("tts")
    assert model_threads(found)
    assert all(t["policy"] == os.SCHED_IDLE for t in model_threads(found))
    assert not [t for t in found["threads"] if t["policy"] == os.SCHED_IDLE and t["nice"] != 10]
