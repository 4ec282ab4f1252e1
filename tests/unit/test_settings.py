"""Settings from the environment (docs/protocol.md §5)."""
from shared.config import Settings


def test_defaults():
    s = Settings(_env_file=None)
    assert s.connection_events_channel == "connection_events"
    assert s.redis_url is None and s.redis_url_or_default == "redis://127.0.0.1:6379/0"
    assert s.api_keys == [] and s.log_format == "text"


def test_environment_and_comma_lists(monkeypatch):
    monkeypatch.setenv("VOICEPIPE_API_KEYS", " a, b ,,c ")
    monkeypatch.setenv("VOICEPIPE_GUARD_BLOCKED_TERMS", "Secret,Other ")
    monkeypatch.setenv("VOICEPIPE_CONNECTION_EVENTS_CHANNEL", "events2")
    monkeypatch.setenv("VOICEPIPE_STALE_TIMEOUT_S", "7.5")
    s = Settings(_env_file=None)
    assert s.api_keys == ["a", "b", "c"]
    assert s.guard_blocked_terms == ["Secret", "Other"]
    assert s.connection_events_channel == "events2" and s.stale_timeout_s == 7.5


def test_dotenv_file(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text("VOICEPIPE_LLM_MODEL=llama3\nVOICEPIPE_CLIENT_TOKENS=x,y\n")
    s = Settings(_env_file=str(env))
    assert s.llm_model == "llama3" and s.client_tokens == ["x", "y"]
