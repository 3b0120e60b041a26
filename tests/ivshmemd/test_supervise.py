"""The supervisor: readiness by sd_notify, event streams, logs in failure messages,
terminate-then-kill, with real child processes (both drivers)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from ivshmemd.supervise import (
    Child,
    ChildError,
    SyncChild,
    exit_text,
    open_supervisor,
    parse_event,
    parse_notify,
    sync_supervisor,
)
from ivshmemd.supervise.record import LineBuffer

#: A child that logs, reports two events, says READY=1 (and a STATUS), then waits for a
#: line on stdin and exits with the number it was sent.
CHILD = """
import json, sys
from ivshmemd.sdnotify import notify
print("starting", file=sys.stderr, flush=True)
print(json.dumps({"event": "hello", "n": 1}), flush=True)
print("not json", flush=True)
notify({"READY": 1, "STATUS": "serving"})
print(json.dumps({"event": "hello", "n": 2}), flush=True)
sys.exit(int(sys.stdin.readline()))
"""
#: A child that says something and dies before it is ready.
EARLY_DEATH = "import sys; print('cannot start: no such thing', file=sys.stderr); sys.exit(3)"
#: A child that ignores SIGTERM once it has said so.
STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from ivshmemd.sdnotify import notify
notify({"READY": 1})
while True:
    time.sleep(3600)
"""
#: A child that reports whether it sees a NOTIFY_SOCKET.
ENVIRONMENT = """
import json, os
print(json.dumps({"event": "env", "notify": os.environ.get("NOTIFY_SOCKET")}))
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_record_parses_what_children_say() -> None:
    assert parse_notify(b"READY=1\nSTATUS=2 peers\nnonsense\n") == {
        "READY": "1",
        "STATUS": "2 peers",
    }
    assert parse_event('{"event": "x", "n": 1}') == {"event": "x", "n": 1}
    assert parse_event("plain text") == {"event": "stdout", "text": "plain text"}
    assert parse_event("[1, 2]") == {"event": "stdout", "text": "[1, 2]"}
    assert parse_event("   ") is None
    lines = LineBuffer()
    assert lines.feed(b"one\ntw") == ["one"]
    assert lines.feed(b"o\n\nthr") == ["two", ""]
    assert lines.close() == ["thr"]
    assert (exit_text(None), exit_text(0), exit_text(-signal.SIGKILL)) == (
        "still running",
        "exit code 0",
        "killed by SIGKILL",
    )


async def test_a_trio_child_is_ready_when_it_says_so() -> None:
    async with open_supervisor() as supervisor:
        child = await supervisor.start(Child(python(CHILD)), notify=True, events=True, stdin=True)
        await child.wait_ready()
        assert child.notified == {"READY": "1", "STATUS": "serving"}
        await child.wait_event(event="hello", n=2)
        assert list(child.events)[:2] == [
            {"event": "hello", "n": 1},
            {"event": "stdout", "text": "not json"},
        ]
        assert child.first_of["hello"] == {"event": "hello", "n": 1}
        assert await child.wait_log("^starting$") == ["starting"]
        await child.send_line("7")
        assert await child.wait_exit() == 7
        assert child.silent


async def test_a_child_that_dies_early_explains_itself() -> None:
    async with open_supervisor() as supervisor:
        child = await supervisor.start(Child(python(EARLY_DEATH)), notify=True)
        with pytest.raises(ChildError, match="ended") as failure:
            await child.wait_ready()
    assert "exit code 3" in str(failure.value)
    assert "cannot start: no such thing" in str(failure.value)


async def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    async with open_supervisor() as supervisor:
        child = await supervisor.start(Child(python(STUBBORN)), notify=True)
        await child.wait_ready()
        assert await child.stop(grace=0.2) == -signal.SIGKILL
        assert child.signals_sent == {signal.SIGTERM, signal.SIGKILL}


async def test_the_callers_notify_socket_never_reaches_a_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@someone-elses-systemd")
    async with open_supervisor() as supervisor:
        plain = await supervisor.start(Child(python(ENVIRONMENT)), events=True)
        ours = await supervisor.start(Child(python(ENVIRONMENT)), events=True, notify=True)
        assert (await plain.wait_event(event="env"))["notify"] is None
        theirs = (await ours.wait_event(event="env"))["notify"]
        assert theirs.startswith("@ivshmem-supervise-")


async def test_closing_the_supervisor_stops_every_child() -> None:
    async with open_supervisor() as supervisor:
        children = [await supervisor.start(Child(python(STUBBORN)), notify=True) for _ in range(2)]
        for child in children:
            await child.wait_ready()
        pids = [child.pid for child in children]
        await supervisor.aclose(grace=0.2)
    assert [child.returncode for child in children] == [-signal.SIGKILL] * 2
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_a_blocking_child_does_the_same() -> None:
    with sync_supervisor() as supervisor:
        child = supervisor.start(SyncChild(python(CHILD)), notify=True, events=True, stdin=True)
        child.wait_ready()
        assert child.notified["STATUS"] == "serving"
        child.wait_event(event="hello", n=2)
        child.send_line("5")
        assert child.wait_exit() == 5
        early = supervisor.start(SyncChild(python(EARLY_DEATH)), notify=True)
        with pytest.raises(ChildError, match="cannot start: no such thing"):
            early.wait_ready()
        stubborn = supervisor.start(SyncChild(python(STUBBORN)), notify=True)
        stubborn.wait_ready()
        assert stubborn.stop(grace=0.2) == -signal.SIGKILL
