"""The robot's membership in the federation: its `flower-supernode` process and its round log.

The agent decides when the robot may federate (agent/daemon.py); this module starts and stops the
real SuperNode with the robot's node config, removes one a killed agent left behind, and reads
`rounds.jsonl`, where the ClientApp notes each round this robot trained in.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path

from agent.supernode import SuperNodeSettings
from fedbot.process_group import signal_group, start_group, stop_group

log = logging.getLogger("fedbot.agent.federation")
ROUNDS_LOG = "rounds.jsonl"
PGID_FILE = "supernode.pgid"


def rounds_joined(output_dir: Path) -> list[dict]:
    """Rounds this robot trained in: {"run", "round", "episodes", "time"} each, oldest first."""
    path = Path(output_dir) / ROUNDS_LOG
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash of the ClientApp
            continue
    return rounds


def note_round(output_dir: Path, entry: dict) -> None:
    """Append one round to rounds.jsonl (called by the ClientApp after local training)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / ROUNDS_LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


class SuperNode:
    """One `flower-supernode` process of this robot, in its own process group."""

    def __init__(self, settings: SuperNodeSettings, state_dir: Path):
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "supernode.log"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kill_leftover()
        flwr_home = self.state_dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        self.process = start_group(self.settings.command(), self.settings.environment(flwr_home), self.log_path)
        (self.state_dir / PGID_FILE).write_text(str(self.process.pid))
        log.info(
            "SuperNode started (pid %d) towards %s; log %s", self.process.pid, self.settings.superlink, self.log_path
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the SuperNode leaves the federation cleanly; SIGKILL after `timeout`."""
        if self.process is None:
            return
        stop_group(self.process, timeout)
        log.info("SuperNode stopped (exit %s)", self.process.returncode)
        (self.state_dir / PGID_FILE).unlink(missing_ok=True)
        self.process = None

    def kill_leftover(self) -> None:
        """Kill the process group of a SuperNode started by an agent that was killed."""
        pgid_file = self.state_dir / PGID_FILE
        if not pgid_file.is_file():
            return
        pgid = int(pgid_file.read_text() or 0)
        if pgid > 0 and _is_flower_group(pgid):
            log.warning("killing SuperNode process group %d left by a previous agent", pgid)
            signal_group(pgid, signal.SIGKILL)
        pgid_file.unlink()


def _is_flower_group(pgid: int) -> bool:
    """Some process of group `pgid` is a Flower process (a reused pgid must not be killed)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) == pgid and b"flower-" in (proc / "cmdline").read_bytes():
                return True
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return False
