"""`python -m bench` (make bench): every benchmark, one after the other, printing its figures."""
import subprocess
import sys

BENCHMARKS = [
    ("voice latency", ["bench.voice_latency", "--rounds", "3"]),
    ("bus hop", ["bench.bus_hop"]),
    ("lifecycle", ["bench.lifecycle"]),
    ("turn-taking", ["bench.turn_taking"]),
    ("redis restart", ["bench.redis_restart"]),
    ("replica failure", ["bench.replica_failure"]),
    ("fair model sharing", ["bench.fairness"]),
    ("gateway capacity", ["bench.gateway_load", "--clients", "50,100,200", "--seconds", "10"]),
    ("rolling restart", ["bench.rolling_restart"]),
    ("audio api", ["bench.audio_api"]),
    ("realtime vs /v1/ws", ["bench.realtime_latency"]),
    ("concurrent spoken conversations", ["bench.concurrent_voice"]),
    ("scaling out", ["bench.scaling"]),
]

if __name__ == "__main__":
    failed = False
    for title, argv in BENCHMARKS:
        print(f"\n=== {title} ===", flush=True)
        failed |= subprocess.call([sys.executable, "-m", *argv]) != 0
    sys.exit(1 if failed else 0)
