"""compose.yaml as shipped: valid against the Compose Specification, complete by default (an LLM
server included), and its services' own commands and environments hold a conversation.

No Docker engine runs here, so the services run as local processes: each one's `command` and
`environment` from compose.yaml, interpolated as compose does with an empty environment (the
defaults of `docker compose up`), the host names `redis` and `llm` mapped to local addresses and
published ports to free ones. The Redis is the test Redis (a unique namespace keeps the test apart);
the llm service is stood in for by the fake OpenAI-compatible server, and its command line is
checked separately without starting llama.cpp.

The schema, tests/support/compose_spec.json, is the Compose Specification JSON schema as the
docker-compose 1.29.2 wheel on PyPI ships it (compose/config/compose_spec.json, Apache-2.0),
copied unchanged: the test suite cannot download anything. It predates some newer keys
(`depends_on.required`, `healthcheck.start_interval`), which compose.yaml therefore does not use."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import jsonschema
import psutil
import pytest
import yaml

from shared.config import Settings
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.client import VoiceClient
from voicepipe.embedded import free_port

ROOT = Path(__file__).parent.parent.parent
COMPOSE = ROOT / "compose.yaml"
SCHEMA = Path(__file__).parent.parent / "support" / "compose_spec.json"
VOICEPIPE_SERVICES = {"gateway", "vad_stt", "llm_orchestrator", "tts"}
WORKERS = {"vad_stt": "vad_stt", "llm_orchestrator": "llm", "tts": "tts"}

# ---- compose's own rules for a file: interpolation and the casts that follow it


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    """`$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR:+alt}`."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VARIABLE.sub(one, value)


def _walk(node, env):
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    """compose.yaml as compose sees it with this environment (default: none set, as in a bare
    `docker compose up`): YAML anchors and merge keys resolved, variables interpolated, and the
    values compose casts after interpolation (replicas, retries) made integers again."""
    config = _walk(yaml.safe_load(COMPOSE.read_text()), env or {})
    for service in config["services"].values():
        deploy = service.get("deploy") or {}
        if isinstance(deploy.get("replicas"), str):
            deploy["replicas"] = int(deploy["replicas"])
        health = service.get("healthcheck") or {}
        if isinstance(health.get("retries"), str):
            health["retries"] = int(health["retries"])
    return config


_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:us|ms|s|m|h))+$")


def seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    assert _DURATION.match(duration), duration
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration))


def default_services(config: dict) -> dict[str, dict]:
    """What `docker compose up` starts: every service without a profile, with more than 0 replicas."""
    return {
        name: service for name, service in config["services"].items()
        if not service.get("profiles") and (service.get("deploy") or {}).get("replicas", 1) > 0
    }


def validate(config: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda value: not isinstance(value, str) or bool(_DURATION.match(value)))
    # it declares draft 2019-09 under a URI jsonschema does not know (http, with a "#")
    assert schema["$schema"].rstrip("#").endswith("json-schema.org/draft/2019-09/schema")
    validator_cls = jsonschema.Draft201909Validator
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema, format_checker=checker).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


EXTERNAL_LLM = {
    "VOICEPIPE_LLM_BASE_URL": "http://host.docker.internal:11434/v1",
    "VOICEPIPE_LLM_MODEL": "llama3.2",
    "VOICEPIPE_SCALE_LLM_SERVER": "0",
    "VOICEPIPE_LLM_SCHEDULING": "false",
}


# ---- the file


def test_schema_is_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    assert {"services", "networks", "volumes"} <= set(schema["properties"])


@pytest.mark.parametrize("env", [{}, EXTERNAL_LLM, {"VOICEPIPE_SCALE_VAD_STT": "3", "VOICEPIPE_SCALE_TTS": "2"}],
                         ids=["defaults", "external-llm", "scaled"])
def test_compose_file_is_valid_against_the_compose_spec(env):
    validate(load_compose(env))


def test_the_validation_catches_mistakes():
    """The schema is strict enough to matter: a misspelt key and a bad condition fail."""
    config = load_compose()
    config["services"]["gateway"]["helthcheck"] = config["services"]["gateway"].pop("healthcheck")
    with pytest.raises(AssertionError, match="helthcheck"):
        validate(config)
    config = load_compose()
    config["services"]["llm_orchestrator"]["depends_on"]["llm"]["condition"] = "healthy"
    with pytest.raises(AssertionError, match="depends_on"):
        validate(config)
    config = load_compose()
    config["services"]["tts"]["stop_grace_period"] = "twenty seconds"
    with pytest.raises(AssertionError, match="stop_grace_period"):
        validate(config)


def test_docker_compose_up_starts_everything_a_turn_needs():
    config = load_compose()
    services = default_services(config)
    assert set(services) == {"redis", "llm", *VOICEPIPE_SERVICES}
    assert not any("profiles" in s for s in config["services"].values())
    llm_url = urlsplit(services["gateway"]["environment"]["VOICEPIPE_LLM_BASE_URL"])
    assert (llm_url.hostname, llm_url.port, llm_url.path) == ("llm", 8080, "/v1")
    for name in VOICEPIPE_SERVICES:
        env = services[name]["environment"]
        assert urlsplit(env["VOICEPIPE_REDIS_URL"]).hostname == "redis"
        assert env["VOICEPIPE_LLM_BASE_URL"] == services["gateway"]["environment"]["VOICEPIPE_LLM_BASE_URL"]
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    # the orchestrator starts only once the LLM server answers, and shares it out in slices
    assert services["llm_orchestrator"]["depends_on"]["llm"] == {"condition": "service_healthy"}
    assert services["llm_orchestrator"]["environment"]["VOICEPIPE_LLM_SCHEDULING"] == "true"
    probe = " ".join(services["llm"]["healthcheck"]["test"])
    assert "127.0.0.1:8080/v1/models" in probe


def test_the_llm_is_switchable_to_any_openai_compatible_server():
    config = load_compose(EXTERNAL_LLM)
    services = default_services(config)
    assert "llm" not in services  # 0 replicas: compose starts none and does not wait for it
    orchestrator = services["llm_orchestrator"]
    assert orchestrator["environment"]["VOICEPIPE_LLM_BASE_URL"] == "http://host.docker.internal:11434/v1"
    assert orchestrator["environment"]["VOICEPIPE_LLM_MODEL"] == "llama3.2"
    assert orchestrator["environment"]["VOICEPIPE_LLM_SCHEDULING"] == "false"  # slices are for the bundled server
    assert "host.docker.internal:host-gateway" in orchestrator["extra_hosts"]


def test_every_service_has_a_healthcheck_replicas_and_time_to_clean_up():
    config = load_compose()
    for name, service in config["services"].items():
        health = service["healthcheck"]
        assert health["test"][0] == "CMD", name
        assert seconds(health["timeout"]) < seconds(health["interval"]) + 1, name
    for name in VOICEPIPE_SERVICES:
        service = config["services"][name]
        assert service["deploy"]["replicas"] == 1
        # gateway: shutdown rounds + the workers' confirmation (2 s); workers: releasing what they hold
        assert seconds(service["stop_grace_period"]) >= 15, name
    scaled = load_compose({"VOICEPIPE_SCALE_VAD_STT": "3", "VOICEPIPE_SCALE_ORCHESTRATOR": "2"})["services"]
    assert (scaled["vad_stt"]["deploy"]["replicas"], scaled["llm_orchestrator"]["deploy"]["replicas"]) == (3, 2)


class _Exec(Exception):
    pass


def test_llm_service_command_is_the_embedded_llm_server(monkeypatch):
    """The llm service's command, run up to its exec (which is caught): voicepipe's
    OpenAI-compatible LLM server with the SmolLM2 weights, on every interface, on the port the
    default VOICEPIPE_LLM_BASE_URL and the healthcheck use."""
    service = load_compose()["services"]["llm"]
    command = service["command"]
    assert command[:2] == ["python", "-c"] and len(command) == 3
    seen: list[list[str]] = []

    def fake_exec(path, argv):
        seen.append(list(argv))
        raise _Exec

    monkeypatch.setattr(os, "execv", fake_exec)
    monkeypatch.setattr(os, "execvp", fake_exec)
    with pytest.raises(_Exec):
        exec(compile(command[2], "<llm command>", "exec"), {"__name__": "__main__"})
    argv = seen[0]
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "voicepipe.llm_server"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--host"] == "0.0.0.0"
    assert options["--port"] == "8080"
    assert options["--alias"] == load_compose()["services"]["llm_orchestrator"]["environment"]["VOICEPIPE_LLM_MODEL"]
    assert Path(options["--model"]).is_file()
    import importlib.util

    assert importlib.util.find_spec("voicepipe.llm_server") is not None


def test_dockerfile_builds_dependencies_before_the_source_and_runs_without_compilers():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("# syntax=docker/dockerfile:1")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    names = [stage.split("\n", 1)[0].split(" AS ")[-1].strip() for stage in stages]
    assert names == ["deps", "app", "runtime"]
    deps, app, runtime = stages
    assert "COPY pyproject.toml ./" in deps and not re.search(r"COPY (shared|gateway|workers|voicepipe)", deps)
    assert "--mount=type=cache,target=/root/.cache/pip" in deps and "pip wheel" in deps
    assert "build-essential" not in runtime and "cmake" not in runtime
    assert "--no-index" in runtime
    assert re.search(r"^USER (?!root|0)\S+", runtime, flags=re.M)
    assert "HEALTHCHECK" in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".pytest_cache", "**/__pycache__", ".env"} <= set(ignored)


# ---- the services as processes


def _local_argv(command: list[str]) -> list[str]:
    """The container's `python` and `voicepipe` are this venv's."""
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "voicepipe":
        script = Path(sys.executable).parent / "voicepipe"
        return [str(script), *command[1:]] if script.exists() else [sys.executable, "-m", "voicepipe", *command[1:]]
    raise AssertionError(f"unexpected command {command}")


def _map_url(url: str, hosts: dict[tuple[str, int], tuple[str, int]]) -> str:
    parts = urlsplit(url)
    target = hosts.get((parts.hostname, parts.port))
    if target is None:
        return url
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{target[0]}:{target[1]}" if auth else f"{target[0]}:{target[1]}"
    return urlunsplit(parts._replace(netloc=netloc))


def _map_port(argv: list[str], ports: dict[int, int]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--port" and int(out[i + 1]) in ports:
            out[i + 1] = str(ports[int(out[i + 1])])
    for old, new in ports.items():  # the healthcheck's own URL
        out = [re.sub(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", arg) for arg in out]
    return out


class Services:
    """Each service's compose command as a local process, logs in files; stopped with SIGTERM."""

    def __init__(self, services: dict[str, dict], env: dict[str, str], hosts, ports, log_dir: Path) -> None:
        self.services, self.env, self.hosts, self.ports, self.log_dir = services, env, hosts, ports, log_dir
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs = []

    def env_of(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        for key, value in self.services[name].get("environment", {}).items():
            env[key] = _map_url(str(value), self.hosts) if "://" in str(value) else str(value)
        return env

    def start(self, name: str) -> None:
        for replica in range(self.services[name].get("deploy", {}).get("replicas", 1)):
            log = open(self.log_dir / f"{name}-{replica}.log", "wb")
            self.logs.append(log)
            argv = _map_port(_local_argv(self.services[name]["command"]), self.ports)
            process = subprocess.Popen(argv, env=self.env_of(name), stdout=log, stderr=subprocess.STDOUT)
            self.processes.append((name, process))

    def healthcheck(self, name: str) -> int:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = _map_port(_local_argv(test[1:]), self.ports)
        timeout = seconds(self.services[name]["healthcheck"]["timeout"]) + 10  # + interpreter start on a busy box
        return subprocess.run(argv, env=self.env_of(name), capture_output=True, timeout=timeout).returncode

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}" for path in sorted(self.log_dir.glob("*.log"))
        )

    def assert_running(self) -> None:
        dead = [(name, p.returncode) for name, p in self.processes if p.poll() is not None]
        assert not dead, f"exited: {dead}\n{self.log_tail()}"

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every process, then wait each one's stop_grace_period (SIGKILL after it, as
        compose does, and the exit code says so)."""
        tree = []
        for _, process in self.processes:
            try:
                tree += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, process in self.processes:
            grace = seconds(self.services[name].get("stop_grace_period", "10s"))
            try:
                codes[f"{name}:{process.pid}"] = process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                codes[f"{name}:{process.pid}"] = None
        for log in self.logs:
            log.close()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for process in alive:
            process.kill()
        assert not alive, f"left running: {[p.pid for p in alive]}"
        return codes


@pytest.fixture
def compose_redis(redis_url):
    """The test Redis at the `redis` service's address, and a namespace of this test's own."""
    parts = urlsplit(redis_url)
    ns = f"compose-{uuid.uuid4().hex[:8]}"
    yield (parts.hostname, parts.port or 6379), ns
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{ns}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def _wait_ready(url: str, stack: Services, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        stack.assert_running()
        try:
            answer = httpx.get(f"{url}/readyz", timeout=2)
            last = answer.text
            if answer.status_code == 200:
                return answer.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise AssertionError(f"not ready in {timeout} s: {last}\n{stack.log_tail()}")


@pytest.mark.e2e
def test_compose_services_as_processes_answer_a_typed_turn(compose_redis, tmp_path):
    (redis_host, redis_port), ns = compose_redis
    config = load_compose()
    services = default_services(config)
    assert shutil.which(sys.executable)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    base_env.update(
        PYTHONUNBUFFERED="1",
        VOICEPIPE_NAMESPACE=ns,  # isolation on the shared test Redis, as tests/e2e/test_processes.py does
        VOICEPIPE_CONNECTION_EVENTS_CHANNEL=f"{ns}:connection_events",
        VOICEPIPE_TTS_CONTROL_CHANNEL=f"{ns}:tts_control",
    )
    with FakeLlmServer(FakeLlm()) as llm:  # stands in for the llm service, at its address
        hosts = {("redis", 6379): (redis_host, redis_port), ("llm", 8080): ("127.0.0.1", llm.port)}
        gateway_port = free_port()
        stack = Services(services, base_env, hosts, {8000: gateway_port}, tmp_path)
        assert urlsplit(stack.env_of("llm_orchestrator")["VOICEPIPE_LLM_BASE_URL"]).port == llm.port
        # no worker of this namespace yet: every worker's healthcheck fails
        assert {stack.healthcheck(name) for name in WORKERS} == {1}
        try:
            for name in ("vad_stt", "llm_orchestrator", "tts", "gateway"):
                stack.start(name)
            url = f"http://127.0.0.1:{gateway_port}"
            ready = _wait_ready(url, stack, timeout=240)
            assert ready["workers"] == {"vad_stt": 1, "llm": 1, "tts": 1}
            # every service's own healthcheck passes against the running processes; the workers'
            # find their heartbeat by host name, which all local processes share
            assert {name: stack.healthcheck(name) for name in VOICEPIPE_SERVICES} == dict.fromkeys(VOICEPIPE_SERVICES, 0)

            async def typed_turn():
                async with VoiceClient(f"ws://127.0.0.1:{gateway_port}/v1/ws") as client:
                    await client.send_json({"type": "text.input", "text": "What is the capital of France?"})
                    return await client.receive_turn(timeout=120)

            turn = asyncio.run(typed_turn())
            assert turn.errors == []
            assert turn.done is not None and turn.done["text"].strip() == llm.reply
            assert len(turn.audio) > 0
            # compose's orchestrator schedules replies: one reply, asked for in slices (completions on
            # the ChatML prompt), every one of them about the typed question, the first one short
            assert llm.streams and all(r.prompt is not None for r in llm.streams)
            assert {r.messages[-1]["content"] for r in llm.streams} == {"What is the capital of France?"}
            assert llm.streams[0].max_tokens == Settings().llm_first_slice_tokens
        finally:
            codes = stack.stop()
        # graceful exits only (None: killed after stop_grace_period). uvicorn re-raises the signal
        # it caught once its shutdown is done, so the gateway ends by SIGTERM, after its cleanup
        assert all(code == 0 for key, code in codes.items() if not key.startswith("gateway:")), f"{codes}\n{stack.log_tail()}"
        assert {code for key, code in codes.items() if key.startswith("gateway:")} <= {0, -signal.SIGTERM}, codes
        # a stopped worker withdraws its heartbeat at once: the healthchecks fail again
        assert {stack.healthcheck(name) for name in WORKERS} == {1}
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    for name in [*WORKERS, "gateway"]:  # each process released what it held on SIGTERM, and said so
        assert "Shutdown cleanup completed" in logs[f"{name}-0.log"], logs[f"{name}-0.log"][-2000:]


@pytest.mark.e2e
def test_llm_service_command_serves_the_model_its_healthcheck_probes(tmp_path):
    """The llm service's command for real (on a free port instead of 8080): its healthcheck passes
    once the server is up, and it answers a chat completion for the default VOICEPIPE_LLM_MODEL."""
    config = load_compose()
    service = config["services"]["llm"]
    model = config["services"]["llm_orchestrator"]["environment"]["VOICEPIPE_LLM_MODEL"]
    port = free_port()
    source = service["command"][2]
    assert "llm_argv(8080)" in source
    argv = _local_argv([*service["command"][:2], source.replace("llm_argv(8080)", f"llm_argv({port})")])
    probe = _map_port(_local_argv(service["healthcheck"]["test"][1:]), {8080: port})
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    with open(tmp_path / "llm.log", "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        tree: list[psutil.Process] = []
        try:
            deadline = time.monotonic() + 180
            while subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0:
                assert process.poll() is None, (tmp_path / "llm.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "llm.log").read_text()[-3000:]
                time.sleep(0.5)
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            assert any("voicepipe.llm_server" in " ".join(p.cmdline()) for p in tree)
            answer = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]},
                timeout=120,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"].strip()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(seconds(service["stop_grace_period"]))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(10)
                raise AssertionError("the llm server did not stop within its stop_grace_period") from None
    assert code in (0, -signal.SIGTERM), code
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [p.pid for p in alive]
