"""Scheduling priority for model compute.

Inference (whisper, piper, llama) saturates the cores in bursts; the event loops that carry the
bus, the sockets and cleanup need a sliver of CPU at exactly those moments. Inference threads run
at a higher nice value, so the kernel lets the event loops in first; with an idle CPU they lose
nothing. Threads a model library starts inherit the nice value of the thread that loaded it."""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("voicepipe.priority")


def deprioritize_current_thread(nice: int) -> None:
    """Give the calling thread (only) this nice value; a no-op for 0 or where not supported."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.debug("could not lower the thread priority: %s", exc)
