"""The robot's Flower SuperNode: how it is started against the coordinator's SuperLink.

The SuperNode is a real `flower-supernode` process, started by agent/warm_clientapp.py, which runs
its ClientApps (every message is a new process) from a fork server that imported torch and lerobot
once. Its node config tells the ClientApp where this
robot's dataset, model inbox and outputs are (agent/node.py). With TLS it trusts the lab's CA; with
authentication it signs in with the robot's private key (`fedbot-coordinator credentials`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fedbot.flower_processes import BIN, flower_environment, installed_app_sha256


@dataclass(frozen=True)
class SuperNodeSettings:
    superlink: str  # host:port of the coordinator's SuperLink
    dataset_root: Path
    model_inbox: Path
    output_dir: Path
    robot_id: str
    port: int = 9094  # the SuperNode's own Runtime API (one per SuperNode on a host)
    root_certificates: Path | None = None  # the lab CA; None = insecure (local development)
    auth_key: Path | None = None  # the robot's private key, for SuperNode authentication

    def node_config(self) -> str:
        """Flower's `--node-config` string; paths absolute, as the ClientApp runs elsewhere."""
        values = {
            "dataset-root": Path(self.dataset_root).resolve(),
            "model-inbox": Path(self.model_inbox).resolve(),
            "output-dir": Path(self.output_dir).resolve(),
            "robot-id": self.robot_id,
        }
        return " ".join(f"{key}='{value}'" for key, value in values.items())

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
