"""`voicepipe talk --url` takes whatever address of the gateway a person would type."""
from __future__ import annotations

import pytest

from voicepipe.talk import talk, websocket_url


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("ws://127.0.0.1:8000/v1/ws", "ws://127.0.0.1:8000/v1/ws"),
        ("http://127.0.0.1:8123", "ws://127.0.0.1:8123/v1/ws"),
        ("http://127.0.0.1:8123/", "ws://127.0.0.1:8123/v1/ws"),
        ("https://voice.example.com", "wss://voice.example.com/v1/ws"),
        ("localhost:8000", "ws://localhost:8000/v1/ws"),
        ("wss://voice.example.com/v1/ws?token=abc", "wss://voice.example.com/v1/ws?token=abc"),
    ],
)
def test_gateway_addresses_become_the_websocket_url(typed, expected):
    assert websocket_url(typed) == expected


def test_an_unusable_address_is_a_clear_error(capsys):
    wav = __import__("pathlib").Path(__file__).parent.parent / "fixtures" / "capital.wav"
    assert talk(str(wav), "ftp://example.com", "/dev/null") == 2
    assert "is not a ws://" in capsys.readouterr().err
