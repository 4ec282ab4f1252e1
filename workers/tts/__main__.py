"""`python -m workers.tts`: one TTS worker process."""
from workers.runtime import main
from workers.tts.handler import TtsWorker

if __name__ == "__main__":
    main(TtsWorker)
