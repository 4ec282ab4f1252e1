"""`python -m workers.llm_orchestrator`: one LLM orchestrator process."""
from workers.llm_orchestrator.handler import LlmWorker
from workers.runtime import main

if __name__ == "__main__":
    main(LlmWorker)
