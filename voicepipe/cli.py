"""`voicepipe`: up | gateway | worker STAGE | talk FILE (docs/protocol.md §4)."""
from __future__ import annotations

import argparse
import sys

from shared.config import Settings

WORKERS = {
    "vad_stt": ("workers.vad_stt.handler", "VadSttWorker"),
    "llm": ("workers.llm_orchestrator.handler", "LlmWorker"),
    "tts": ("workers.tts.handler", "TtsWorker"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicepipe", description="Distributed real-time voice assistant pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("up", "the whole stack on this machine"), ("gateway", "the gateway process")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
        cmd.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    worker = sub.add_parser("worker", help="one worker process")
    worker.add_argument("stage", choices=sorted(WORKERS))
    talk = sub.add_parser("talk", help="speak an audio file to a running stack")
    talk.add_argument("file", help="an audio file: WAV, MP3, OGG, FLAC, M4A... (any rate or channel count; converted to 16 kHz mono)")
    talk.add_argument("--url", default=None, help="the gateway: ws://host:port/v1/ws or http://host:port (default ws://127.0.0.1:8000/v1/ws)")
    talk.add_argument("--out", default="reply.wav", help="where to save the reply audio")
    talk.add_argument("--timeout", type=float, default=60.0)
    talk.add_argument("--token", default=None, help="client token, sent as Authorization: Bearer (default: first of VOICEPIPE_CLIENT_TOKENS)")
    from voicepipe.simulate import add_arguments

    add_arguments(sub.add_parser("simulate-disconnects", help="drop clients at every phase and prove nothing leaks"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:  # a bad VOICEPIPE_ value: say which, without a traceback
        sys.exit(f"voicepipe: invalid settings (environment variables VOICEPIPE_<NAME> or .env): {exc}")
    if args.command == "up":
        from shared.logging import setup_logging
        from voicepipe.supervisor import up

        setup_logging(settings.log_level, settings.log_format, "voicepipe-up")
        sys.exit(up(settings, args.host or settings.host, args.port or settings.port))
    if args.command == "gateway":
        from gateway.__main__ import main as gateway_main

        gateway_main(settings, args.host, args.port)
    elif args.command == "worker":
        import importlib

        from workers.runtime import main as worker_main

        module, cls = WORKERS[args.stage]
        worker_main(getattr(importlib.import_module(module), cls), settings)
    elif args.command == "talk":
        from voicepipe.talk import talk

        url = args.url or f"ws://127.0.0.1:{settings.port}/v1/ws"
        token = args.token or (settings.client_tokens[0] if settings.client_tokens else None)
        sys.exit(talk(args.file, url, args.out, args.timeout, token))
    elif args.command == "simulate-disconnects":
        from voicepipe.simulate import main as simulate_main

        sys.exit(simulate_main(args, settings))
