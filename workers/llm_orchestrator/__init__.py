"""LLM orchestrator stage: streams the reply, hands sentences to TTS, keeps the history."""
