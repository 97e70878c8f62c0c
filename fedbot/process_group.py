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


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
