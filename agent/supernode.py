"""The robot's Flower SuperNode: how it is configured and started, from both sides, and its round log.

The agent side: `SuperNodeSettings` turns the agent config into a real `flower-supernode` command
line, started by agent/warm_clientapp.py, which runs its ClientApps (every message is a new process)
from a fork server that imported torch and lerobot once. With TLS it trusts the lab's CA; with
authentication it signs in with the robot's private key (`fedbot-coordinator credentials`).
`SuperNode` is that process, started and stopped as a process group; it also removes one a killed
agent left behind. When the SuperNode runs is decided by agent/federation.py.

The ClientApp side: the SuperNode's node config tells the ClientApp (agent/client_app.py) where this
robot's dataset, model inbox and outputs are (`NodeSettings`), and the ClientApp notes each round it
trained in into `rounds.jsonl` under the outputs (`NodeSettings.note_round`, the newest `keep-rounds`
kept), which the idle rules read back (`rounds_joined`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedbot.atomic_files import write_bytes_atomic
from fedbot.flower_processes import BIN, flower_environment, installed_app_sha256
from fedbot.process_group import signal_group, start_group, stop_group
from fedbot.retention import LogRotation, append_line

log = logging.getLogger("fedbot.agent.federation")  # the name the SuperNode's log lines have always had
ROUNDS_LOG = "rounds.jsonl"
KEEP_ROUNDS = 1000  # rounds.jsonl lines kept by default (agent config [retention] rounds)
PGID_FILE = "supernode.pgid"


# -- the ClientApp side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSettings:
    """Per-robot paths. A real SuperNode gets them with `--node-config "dataset-root='...' ..."`;
    the simulation engine gives virtual nodes only a partition id, so there robot i uses
    `<sim-data-dir>/robot<i>` and folders beside it."""

    name: str
    dataset_root: Path
    model_inbox: Path
    output_dir: Path
    keep_rounds: int = KEEP_ROUNDS  # lines of rounds.jsonl kept

    @classmethod
    def from_configs(cls, node_config: dict, sim_data_dir: str) -> NodeSettings:
        if "dataset-root" in node_config:
            root = Path(str(node_config["dataset-root"]))
        elif "partition-id" in node_config:
            root = Path(sim_data_dir) / f"robot{node_config['partition-id']}"
        else:
            raise ValueError(
                "node config has no 'dataset-root' (flower-supernode --node-config \"dataset-root='DIR'\")"
            )
        name = str(node_config.get("robot-id", root.name))
        keep_rounds = node_config.get("keep-rounds", KEEP_ROUNDS)
        if not isinstance(keep_rounds, int) or not 1 <= keep_rounds <= 1_000_000:
            raise ValueError(f"node config 'keep-rounds' must be an integer in 1..1000000, got {keep_rounds!r}")
        return cls(
            name=name,
            dataset_root=root,
            model_inbox=Path(str(node_config.get("model-inbox", root.parent / f"{root.name}-inbox"))),
            output_dir=Path(str(node_config.get("output-dir", root.parent / f"{root.name}-outputs"))),
            keep_rounds=keep_rounds,
        )

    def note_round(self, entry: dict) -> None:
        """Append one round to rounds.jsonl, which keeps the newest `keep_rounds` (called by the
        ClientApp after local training)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        append_line(self.output_dir / ROUNDS_LOG, entry, self.keep_rounds)


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


# -- the agent side -------------------------------------------------------------------------------------
def ensure_auth_key(path: Path) -> Path:
    """The robot's SuperNode authentication key at `path` (ECDSA P-384, OpenSSH format, mode 0600),
    made here on the robot if it does not exist yet; returns its public half, `<path>.pub`, which
    is all that goes to the lab server (`fedbot-coordinator run --register-dir`)."""
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    if not path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        write_bytes_atomic(path, pem, private=True)
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(public, line + b"\n")
    return public


@dataclass(frozen=True)
class SuperNodeSettings:
    superlink: str  # host:port of the coordinator's SuperLink
    dataset_root: Path
    model_inbox: Path
    output_dir: Path
    robot_id: str
    keep_rounds: int = KEEP_ROUNDS
    port: int = 9094  # the SuperNode's own Runtime API (one per SuperNode on a host)
    root_certificates: Path | None = None  # the lab CA; None = insecure (local development)
    auth_key: Path | None = None  # the robot's private key, for SuperNode authentication

    def node_config(self) -> str:
        """Flower's `--node-config` string (read by `NodeSettings.from_configs`); paths absolute, as the
        ClientApp runs elsewhere."""
        values = {
            "dataset-root": Path(self.dataset_root).resolve(),
            "model-inbox": Path(self.model_inbox).resolve(),
            "output-dir": Path(self.output_dir).resolve(),
            "robot-id": self.robot_id,
        }
        return " ".join(f"{key}='{value}'" for key, value in values.items()) + f" keep-rounds={self.keep_rounds}"

    def command(self) -> list[str]:
        """flower-supernode under agent/warm_clientapp.py, which starts its ClientApps warm and only
        those of the fedbot installed here."""
        command = [
            sys.executable,
            "-m",
            "agent.warm_clientapp",
            "--runtime-api-address",
            f"127.0.0.1:{self.port}",
            "--app-sha256",
            installed_app_sha256(),
            "--",
            str(BIN / "flower-supernode"),
            "--superlink",
            self.superlink,
            "--port",
            str(self.port),
            "--node-config",
            self.node_config(),
        ]
        if self.root_certificates is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(Path(self.root_certificates).resolve())]
        if self.auth_key is not None:
            command += ["--auth-supernode-private-key", str(Path(self.auth_key).resolve())]
        return command

    def environment(self, flwr_home: Path) -> dict[str, str]:
        return flower_environment(flwr_home)


class SuperNode:
    """One `flower-supernode` process of this robot, in its own process group."""

    def __init__(self, settings: SuperNodeSettings, state_dir: Path, log_rotation: LogRotation):
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.log_rotation = log_rotation
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "supernode.log"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kill_leftover()
        flwr_home = self.state_dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        self.process = start_group(
            self.settings.command(), self.settings.environment(flwr_home), self.log_path, self.log_rotation
        )
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
