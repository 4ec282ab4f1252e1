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
thread that loaded it."""
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


def deprioritize_current_thread(nice: int, idle: bool = False) -> None:
    """Give the calling thread (only) the inference priority; a no-op where not supported."""
    deprioritize(threading.get_native_id(), nice, idle)
