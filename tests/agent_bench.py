"""A bench for fedbot-agent process tests: its config, the process with a real notify socket, small
tmpfs disks (full or read-only on demand) and the checks of a clean stop."""

from __future__ import annotations

import configparser
import errno
import json
import os
import re
import select
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from agent.config import AgentConfig, ControlSection, CoordinatorSection, IdleSection
from fedbot.control_client import request
from fedbot.flower_processes import BIN, free_port
from fedbot.typed_config import write_toml

from helpers import public_key_line
from processes import Followed

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "fedbot-agent.service"


def status_until(sock: Path, condition, timeout: float = 30.0) -> dict:
    """The agent's status once `condition(status)` holds (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition(status := request(sock, "status")):
        assert time.monotonic() < deadline, f"the status never got there: {json.dumps(status)[:2000]}"
        select.select([], [], [], 0.1)  # the next supervision pass or control ticks
    return status


def timeout_stop_sec() -> float:
    """The agent unit's TimeoutStopSec, in seconds: after that systemd kills the agent."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    value = unit["Service"]["TimeoutStopSec"]
    match = re.fullmatch(r"(\d+)s?", value)
    assert match, f"TimeoutStopSec={value} is not in seconds"
    return float(match.group(1))


STOP_BOUND = timeout_stop_sec() / 2  # a clean stop takes well under the unit's TimeoutStopSec


def write_config(directory: Path, superlink_port: int | None = None, trusted: Path | None = None, **changes) -> Path:
    """A sim agent's TOML in `directory`: data and socket beside it, 30 Hz, no cooldown; by default
    nothing listens at its coordinator address and it needs 1000 new episodes to federate (it stays idle).
    `trusted`: a private key whose signed models the agent takes."""
    config = AgentConfig(
        robot_id="robot-test",
        data_dir=Path("data"),
        socket=Path("agent.sock"),
        coordinator=CoordinatorSection(
            superlink=f"127.0.0.1:{superlink_port or free_port()}", supernode_port=free_port()
        ),
        idle=IdleSection(cooldown_seconds=0.0, min_new_episodes=1 if superlink_port else 1000),
        control=ControlSection(rate_hz=30.0),
    )
    config = replace(config, **changes)
    if trusted is not None:
        config = replace(config, checks=replace(config.checks, trusted_keys=[public_key_line(trusted)]))
    write_toml(directory / "agent.toml", config)
    return directory / "agent.toml"


def start_agent(directory: Path, notify: Path, log_name: str, sim: bool = True) -> Followed:
    """fedbot-agent on `directory`/agent.toml, as systemd runs it: NOTIFY_SOCKET and a 1 s watchdog."""
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000", "SVT_LOG": "1"}
    env.pop("JOURNAL_STREAM", None)
    command = [str(BIN / "fedbot-agent"), "--config", str(directory / "agent.toml")]
    return Followed(command + (["--sim"] if sim else []), directory / log_name, env)


def stop(agent: Followed) -> float:
    """SIGTERM, as `systemctl stop` sends it; the agent must exit with code 0 within STOP_BOUND
    seconds. Returns how long it took."""
    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent ignored SIGTERM for {STOP_BOUND} s; see {agent.log}") from None
    took = time.monotonic() - started
    assert code == 0, f"the agent exited with {code} after SIGTERM; see {agent.log}"
    assert "agent stopped" in agent.text()
    return took


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted on the directory `path` (made if missing) for the block's duration.
    Mounting needs root: without it the test fails, it is not skipped."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        raise AssertionError(
            f"could not mount a tmpfs on {path} ({result.stderr.decode().strip()}): these tests need root"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@contextmanager
def bind(source: Path, target: Path):
    """`source` also seen at `target` (a bind mount), for the block's duration."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=True)


def set_read_only(mount_point: Path, read_only: bool) -> None:
    """Remount the bind mount at `mount_point` read-only or read-write (root is refused writes too)."""
    mode = "ro" if read_only else "rw"
    subprocess.run(["mount", "-o", f"remount,bind,{mode}", str(mount_point)], check=True, capture_output=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file in `directory` until its file system has no space left; returns the file."""
    path = directory / name
    block = b"\0" * (1 << 16)
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    for size in (4096, 512, 1):  # the last partial blocks
        try:
            with open(path, "ab", buffering=0) as f:
                while True:
                    f.write(b"\0" * size)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return path


def group_members(pgid: int) -> list[str]:
    """The processes of process group `pgid` that still run (zombies, waiting to be reaped, do not)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return members


def wait_group_gone(pgid: int, timeout: float) -> list[str]:
    """Wait up to `timeout` seconds for the processes of group `pgid` to end; returns those left."""
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        select.select([], [], [], 0.1)  # SIGKILLed processes take a moment to exit
    return left


def wait_for_text(path: Path, pattern: str, timeout: float, after: int = 0) -> int:
    """Follow the file `path` (a process's log) from byte `after` until a line matches `pattern`;
    returns the offset just past that line."""
    regex = re.compile(pattern.encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(max(0, after))
                offset = max(0, after)
                for line in f:
                    offset += len(line)
                    if regex.search(line):
                        return offset
        select.select([], [], [], 0.1)  # back off before reading the file again
    raise AssertionError(f"no line matching {pattern!r} in {path} within {timeout} s")
