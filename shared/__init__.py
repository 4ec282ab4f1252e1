"""Common code for every voicepipe process: settings, names, messages, bus, logging.

This package never imports the services (gateway, workers, CLI)."""
