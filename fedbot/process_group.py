"""Child services in their own process group: started so that they die with us, stopped as a group.

flower-superlink and flower-supernode each spawn a flower-superexec, which spawns the app processes.
Signalling the whole group reaches all of them; PR_SET_PDEATHSIG makes the direct child get
SIGTERM when its parent dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_group(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `command` as the leader of a new process group, its output appended to `log_path`."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the group, SIGKILL after `timeout`, then SIGKILL to anything left in the group."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        process.wait()
    signal_group(process.pid, signal.SIGKILL)  # a superexec may outlive its parent


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
