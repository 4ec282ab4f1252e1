"""The voicepipe command line and the local process supervisor (`voicepipe up`)."""
