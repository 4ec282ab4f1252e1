"""voicepipe's own OpenAI-compatible LLM server for the bundled model: `python -m voicepipe.llm_server`.

It exists for one reason: a voice stack serves several conversations at once, and each one's next
request repeats its previous prompt. llama-cpp-python's server keeps one KV cache, so
conversations taking turns evaluate their whole prompts again and again; this one keeps a KV
sequence per conversation in one llama.cpp context and steps every request in one batch
(engine.py). The HTTP surface is the OpenAI subset the orchestrator and the SDK use (app.py)."""
