"""Real processes for the tests: a line-by-line log follower, process groups, a systemd notify socket."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedbot.process_group import signal_group


class Followed:
    """A process whose combined output is copied to a log file and can be waited on line by line."""

    def __init__(self, command: list[str], log: Path, env: dict, cwd: Path | None = None):
        self.log = log
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with open(self.log, "a") as out:
            for line in self.process.stdout:
                out.write(line)
                out.flush()
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Block until a line matches `pattern` (fails if the process ends or `timeout` passes first)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; see {self.log}") from None
            if line is None:
                raise AssertionError(f"process ended before a line matched {pattern!r}; see {self.log}")
            if match := regex.search(line):
                return match

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return code

    def text(self) -> str:
        return self.log.read_text()

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        signal_group(self.process.pid, sig)
        self.process.wait(timeout=60)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class NotifySocket:
    """A real sd_notify receiver: the datagram socket a process gets as NOTIFY_SOCKET. Like systemd
    it reads every datagram as it comes (a sender blocks once ~10 datagrams wait unread)."""

    def __init__(self, path: Path, timeout: float = 300.0):
        self.path = path
        self.timeout = timeout  # an upper bound for each wait; each datagram ends it
        self._messages: queue.Queue[dict[str, str]] = queue.Queue()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096).decode()
            except OSError:  # closed
                return
            self._messages.put(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))

    def next(self) -> dict[str, str]:
        try:
            return self._messages.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no notify message on {self.path} within {self.timeout} s") from None

    def drain(self) -> None:
        """Forget the messages received so far (the next `wait_for` sees only later ones)."""
        while True:
            try:
                self._messages.get_nowait()
            except queue.Empty:
                return

    def wait_for(self, key: str, value: str | None = None) -> dict[str, str]:
        """The next message that sets `key` (to `value`, if given)."""
        while True:
            message = self.next()
            if key in message and (value is None or message[key] == value):
                return message

    def close(self) -> None:
        self._sock.close()


CRASH_RECORDER = Path(__file__).with_name("crash_recorder.py")


def run_crash_recorders(base: Path, kills, episodes: int) -> dict:
    """One tests/crash_recorder.py process per (point, at_call, ...) of `kills`, each recording
    `episodes` into its own dataset under `base` and SIGKILLing itself before the `at_call`-th call
    of `point`. They start together: each spends seconds importing lerobot, and side by side they
    share the cores instead of queueing. Returns (dataset root, exit code, stderr) per (point, at_call)."""
    running = {}
    for point, at_call, *_ in kills:
        work = base / f"{point}-{at_call}"
        work.mkdir()
        stderr = open(work / "stderr.txt", "w")
        command = [sys.executable, str(CRASH_RECORDER), str(work / "robot"), str(episodes), point, str(at_call)]
        running[point, at_call] = (work, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr), stderr)
    results = {}
    for key, (work, process, stderr) in running.items():
        code = process.wait(timeout=300)
        stderr.close()
        results[key] = (work / "robot", code, (work / "stderr.txt").read_text())
    return results
