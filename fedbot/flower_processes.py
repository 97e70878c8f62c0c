"""How fedbot starts Flower's processes: where their executables are, the environment each gets,
and free ports for several of them on one host."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flower-superexec and flwr beside python

# The environment of every Flower process fedbot starts (SuperLink, SuperNode, ClientApps, `flwr`).
FLOWER_ENVIRONMENT = {
    # torch's OpenMP threads spin while they wait. Where a ClientApp or the ServerApp shares the
    # cores (the robot's control loop, another ClientApp, the sim evaluation), spinning threads slow
    # everyone down many times over; passive waiting costs little when the process has the cores.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Flower reports usage events to telemetry.flower.ai by default, and a ClientApp's exit waits up
    # to 4 s for that report. A robot talks to its coordinator only.
    "FLWR_TELEMETRY_ENABLED": "0",
    # How often the SuperNode's SuperExec looks for a message to start a ClientApp for (Flower's
    # default 1 s, a local HTTP call each time).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """This process's environment plus FLOWER_ENVIRONMENT, a FLWR_HOME of the process's own (so
    the operator's ~/.flwr is never touched) and BIN first on PATH (Flower starts its helpers by name)."""
    path = f"{BIN}:{os.environ.get('PATH', '')}"
    return {**os.environ, **FLOWER_ENVIRONMENT, "FLWR_HOME": str(flwr_home), "PATH": path}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
