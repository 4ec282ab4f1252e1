"""Scheduling priority for model compute.

Inference (whisper, piper, llama) saturates the cores in bursts; the event loops that carry the
bus, the sockets and cleanup need a sliver of CPU at exactly those moments. Inference threads run
under Linux's SCHED_IDLE policy (`INFERENCE_IDLE`, the default), which the kernel preempts the
moment any normal thread wakes, so an event loop never waits for a model's time slice to end;
with a merely higher nice value (`INFERENCE_NICE`) it can wait a slice or two (~1-3 ms per hop on
two busy cores). With an idle CPU the models lose nothing either way. The trade-off: on a machine
kept busy by other normal-priority work, the models are the ones that slow down (and a worker's
event loop may wait for its own model thread to release the GIL); `INFERENCE_IDLE=false` shares
the CPU fairly instead. Threads a model library starts inherit the policy and nice value of the
thread that loaded it.

Whisper is the exception to SCHED_IDLE (the VAD/STT worker passes `idle=False`; it keeps the
nice value): every transcription is on a turn's critical path, and whisper takes little CPU in all
(about 13 s of the stack's 250 at four conversations), so it goes before the LLM's and piper's
threads instead of sharing the cores with them equally. Measured at four spoken conversations, a
slow turn's end of speech to transcript went from 1.0-2.1 s to 0.4-0.7 s.

OpenMP libraries (llama.cpp, CTranslate2 under whisper; both bring GNU OpenMP) are made to spin
only briefly before they sleep (`short_openmp_waits`): by default a GNU OpenMP thread spins for
300,000 rounds at every barrier while it waits for its partners, and with the cores shared by three
models the partner a thread waits for is often not running, so the spin burns the time others
need (the LLM server used 136-170 s of CPU for four conversations, 58-87 s with no spinning). Not
spinning at all (`OMP_WAIT_POLICY=PASSIVE`) costs a sleep and a wake-up at each of the hundreds of
barriers of a token: SmolLM2 alone took 29 ms a token instead of 10. 3,000 rounds (well under a
millisecond) cover a barrier whose partner is running, and sleep otherwise: 10.6 ms a token alone,
the same time to first audio as passive waits at four and six conversations, and a single conversation's
replies 10-30 ms sooner at the median (docs/PERFORMANCE.md, "Pacing a reply's later pieces")"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("voicepipe.priority")


def deprioritize(target: int, nice: int, idle: bool) -> None:
    """Lower one thread (by native id) or, with 0, the calling thread: SCHED_IDLE and/or nice."""
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            if os.sched_getscheduler(target) != os.SCHED_IDLE:
                os.sched_setscheduler(target, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.debug("could not switch to SCHED_IDLE: %s", exc)
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            if os.getpriority(os.PRIO_PROCESS, target) < nice:
                os.setpriority(os.PRIO_PROCESS, target, nice)
        except OSError as exc:
            log.debug("could not lower the thread priority: %s", exc)


OPENMP_SPIN_COUNT = "3000"  # rounds a waiting OpenMP thread spins before it sleeps


def short_openmp_waits() -> None:
    """Before an OpenMP library loads (it reads this once, when loaded): its threads spin only
    briefly when they wait, then sleep. An OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def deprioritize_current_thread(nice: int, idle: bool = False) -> None:
    """Give the calling thread (only) the inference priority; a no-op where not supported."""
    deprioritize(threading.get_native_id(), nice, idle)
