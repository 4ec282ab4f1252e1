"""TTS stage: piper speaks each piece of the reply as soon as it arrives."""
