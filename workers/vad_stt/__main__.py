"""`python -m workers.vad_stt`: one VAD/STT worker process."""
from workers.runtime import main
from workers.vad_stt.handler import VadSttWorker

if __name__ == "__main__":
    main(VadSttWorker)
