"""Pure helpers of `voicepipe up`: line splitting for the console, log tails, the LLM server's argv."""
from __future__ import annotations

import asyncio
import io
import sys

import pytest

from voicepipe import embedded
from voicepipe.supervisor import TAIL_LINES, Child, LineSplitter, tail_lines


def test_splitter_passes_whole_lines_at_once_and_holds_a_partial_one():
    s = LineSplitter()
    assert s.feed(b"one\ntwo\nthr") == [b"one\n", b"two\n"]
    assert s.feed(b"ee") == []
    assert s.feed(b"\n") == [b"three\n"]
    assert s.feed(b"\r\n") == [b"\r\n"]


def test_splitter_gives_the_last_line_without_newline_at_end_of_file():
    s = LineSplitter()
    assert s.feed(b"a\nb") == [b"a\n"]
    assert s.close() == [b"b\n"]
    assert s.close() == []


def test_splitter_passes_on_a_huge_line_without_newline_in_pieces():
    s = LineSplitter(max_line=10)
    assert s.feed(b"x" * 6) == []
    assert s.feed(b"y" * 6) == [b"x" * 6 + b"y" * 6]
    assert s.feed(b"z\n") == [b"z\n"]


def test_tail_lines_reads_the_end_of_a_file(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(path, 3) == ["line 997", "line 998", "line 999"]
    assert tail_lines(path, 3, max_bytes=40)[-1] == "line 999"
    assert all(line.startswith("line ") for line in tail_lines(path, 50, max_bytes=40))  # no cut first line
    assert tail_lines(tmp_path / "missing.log") == []
    assert tail_lines(path, 0) == []


def test_llm_server_argv_is_voicepipes_own_server_on_the_bundled_weights():
    argv = embedded.llm_argv(12345, "smollm2", threads=2)
    assert argv[1:3] == ["-m", "voicepipe.llm_server"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--port"] == "12345" and options["--alias"] == "smollm2" and options["--threads"] == "2"
    assert options["--model"] == embedded.smollm2_path()


def test_run_dir_is_new_and_under_xdg_runtime_dir_when_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first, second = embedded.run_dir(), embedded.run_dir()
    assert first != second and first.parent == tmp_path and first.name.startswith("voicepipe-run-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert embedded.run_dir().parent != tmp_path / "missing"


def test_child_reprints_every_line_keeps_the_last_ones_and_reports_them(monkeypatch):
    """A real child through pipes: every line reaches the console in order, none lost at exit."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    script = (
        "import sys, time\n"
        "for i in range(500): print(f'out {i}', flush=(i % 7 == 0 or i == 499))\n"
        "time.sleep(0.2)\n"  # the two pipes are read by two tasks: order between them is by arrival
        "sys.stderr.write('boom\\nlast without newline')\n"
        "sys.exit(3)\n"
    )

    async def run() -> Child:
        child = Child("demo", [sys.executable, "-c", script], env={})
        await child.start()
        await child.process.wait()
        await child.drain()
        return child

    child = asyncio.run(run())
    assert out.getvalue().splitlines() == [f"out {i}" for i in range(500)]
    assert err.getvalue() == "boom\nlast without newline\n"
    assert len(child.last_lines()) == TAIL_LINES
    assert child.last_lines()[-2:] == ["boom", "last without newline"]
    report = child.failure_report("during startup")
    assert report.startswith("demo exited with code 3 during startup; its last 20 lines:")
    assert "  | last without newline" in report


def test_child_with_a_log_file_reports_from_the_file(tmp_path):
    async def run() -> Child:
        child = Child("svc", [sys.executable, "-c", "print('loading', flush=True); raise SystemExit('bad model')"], env={},
                      log_path=tmp_path / "svc.log")
        await child.start()
        await child.process.wait()
        await child.drain()
        return child

    child = asyncio.run(run())
    assert child.last_lines() == ["loading", "bad model"]
    assert f"({tmp_path / 'svc.log'})" in child.failure_report("during startup")


@pytest.mark.parametrize("n", [1, 5])
def test_last_lines_of_a_piped_child_are_bounded(n):
    child = Child("x", [], env={})
    child.tail.extend(str(i) for i in range(100))
    assert child.last_lines(n) == [str(i) for i in range(100 - n, 100)]


def test_an_invalid_setting_is_reported_without_a_traceback(monkeypatch, capsys):
    from voicepipe.cli import main

    monkeypatch.setenv("VOICEPIPE_VAD_AGGRESSIVENESS", "9")
    with pytest.raises(SystemExit) as exited:
        main(["up"])
    message = str(exited.value.code)
    assert message.startswith("voicepipe: invalid settings") and "vad_aggressiveness" in message


def test_a_readiness_wait_ends_the_moment_a_child_exits_even_mid_check():
    from shared.config import Settings
    from voicepipe.supervisor import ChildDied, Supervisor

    async def run() -> tuple[float, ChildDied]:
        sup = Supervisor(Settings(), "127.0.0.1", 0)
        await sup._start(Child("quitter", [sys.executable, "-c", "import time; time.sleep(0.3); print('bye')"], env={}))

        async def slow_check() -> bool:
            await asyncio.sleep(30)  # a check stuck on its own timeout
            return True

        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(ChildDied) as died:
                await sup._wait_for(slow_check, "something", 60)
            return loop.time() - started, died.value
        finally:
            await sup.stop()

    elapsed, died = asyncio.run(run())
    assert died.child.name == "quitter"
    assert elapsed < 10
    assert died.child.last_lines() == ["bye"]
