"""VAD/STT stage: webrtcvad finds the utterance, faster-whisper transcribes it."""
