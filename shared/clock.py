"""Wall-clock milliseconds, the unit of every timestamp on the bus."""
import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def now_ms_float() -> float:
    return time.time_ns() / 1_000_000
