"""Child services in their own process group: started so that they die with us, stopped as a group.

flower-superlink and flower-supernode each spawn a flower-superexec, which spawns the app processes.
Signalling the whole group reaches all of them; PR_SET_PDEATHSIG makes the direct child get
SIGTERM when its parent dies, however it dies (SIGKILL included). Their output goes to a log file
rotated by size (fedbot/retention.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path

from fedbot.retention import LogRotation, capture_output

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class GroupLeader(subprocess.Popen):
    """A child started by `start_group`, with the thread that copies its output into its log."""

    output_copier: threading.Thread


def start_group(command: list[str], env: dict[str, str], log_path: Path, rotation: LogRotation) -> GroupLeader:
    """Start `command` as the leader of a new process group, its output appended to `log_path`,
    which is rotated as `rotation` says."""
    process = GroupLeader(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    process.output_copier = capture_output(process.stdout, log_path, rotation)
    return process


def stop_group(process: GroupLeader, timeout: float) -> None:
    """SIGTERM to the group, SIGKILL after `timeout`, then SIGKILL to anything left in the group;
    returns once the group's last output is in its log."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        process.wait()
    signal_group(process.pid, signal.SIGKILL)  # a superexec may outlive its parent
    process.output_copier.join(timeout=timeout)  # the pipe closes with the last process of the group


def stop_with_sessions_below(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the group `process` leads, then SIGKILL to the groups of every process that was
    below it in groups of their own."""
    below = groups_below(process.pid)
    signal_group(process.pid, signal.SIGTERM)
    process.wait(timeout=timeout)
    for group in below:
        signal_group(group, signal.SIGKILL)


def groups_below(pid: int) -> set[int]:
    """The process groups of every process below `pid` now, other than `pid`'s own group. A process
    that made a session of its own (Flower's simulation, Ray's workers) is not reached by signalling
    its ancestor's group, and outlives it. (From /proc: psutil is no dependency of fedbot.)"""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(name)": state, ppid, pgrp, ...
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
    groups, below = set(), [pid]
    while below:
        for child, group in children.get(below.pop(), []):
            groups.add(group)
            below.append(child)
    return groups - {pid}


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def processes_with(variable: str, value: str, commands: set[str]) -> list[int]:
    """The processes whose environment sets `variable` to `value` and whose program is one of
    `commands` (the name of the executable or of the script an interpreter runs). A coordinator
    SIGKILLed mid-run leaves its ServerApp behind: Flower's parent monitor sends it SIGINT, and it
    waits on, holding its memory (Flower 1.42)."""
    wanted = f"{variable}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")[:2]
            environment = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted in environment and any(os.path.basename(arg.decode(errors="replace")) in commands for arg in argv):
            found.append(int(proc.name))
    return found
