"""The pipeline's workers: vad_stt, llm_orchestrator, tts. Each is one process kind."""
