"""The coordinator's Flower SuperLink process and the `flwr` CLI pointed at it.

`SuperLink` starts a real `flower-superlink` (insecure for local development, or TLS with optional
SuperNode authentication), keeps its state in a database under the coordinator's state directory
(runs, registered robots), and stops it with the coordinator: the child gets SIGTERM if the
coordinator dies (PR_SET_PDEATHSIG), so a killed coordinator leaves no SuperLink behind.

The SuperLink itself listens on 127.0.0.1 (a port chosen at each start); robots reach it through
the fleet gateway on the public `host:port`, which forwards Flower's Fleet API only
(coordinator/fleet_gateway.py). `flwr` commands reach the SuperLink through a connection named
`fedbot` in a FLWR_HOME of its own, so the operator's `~/.flwr` is never touched:
`FLWR_HOME=<state-dir>/flwr-home flwr ls fedbot` on the coordinator's host.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coordinator.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from coordinator.fleet_gateway import FleetGateway
from fedbot.flower_processes import BIN, flower_environment, free_port
from fedbot.process_group import processes_with, start_group, stop_group
from fedbot.retention import LogRotation

log = logging.getLogger("fedbot.coordinator")
CONNECTION = "fedbot"
ACTIVE_RUN_STATES = ("pending", "starting", "running")
REGISTER_PARALLEL = 4  # flwr processes registering keys at once
FLOWER_SERVICES = {"flower-superlink", "flower-superexec", "flwr-serverapp"}  # what a SuperLink runs


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where the SuperLink listens, where it keeps its state, and how it is secured."""

    state_dir: Path
    host: str = "127.0.0.1"  # where robots reach the fleet gateway
    port: int = 9092
    tls_dir: Path | None = None  # holds ca.crt, server.pem, server.key (`fedbot-coordinator credentials`)
    auth: bool = False  # only registered robots may join (needs TLS)
    log_rotation: LogRotation = LogRotation()  # of <state-dir>/superlink.log

    def __post_init__(self):
        if self.auth and self.tls_dir is None:
            raise ValueError("SuperNode authentication needs TLS: give --tls DIR as well as --auth")
        if self.tls_dir is not None:
            missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (self.tls_dir / n).is_file()]
            if missing:
                raise ValueError(
                    f"TLS directory {self.tls_dir} lacks {missing}; create them with "
                    "`fedbot-coordinator credentials --out DIR --host HOST`"
                )

    @property
    def address(self) -> str:
        """What robots dial (the fleet gateway)."""
        return f"{self.host}:{self.port}"

    def tls_files(self) -> tuple[Path, Path, Path] | None:
        if self.tls_dir is None:
            return None
        tls = self.tls_dir.resolve()
        return tls / CA_CERT, tls / SERVER_CERT, tls / SERVER_KEY

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    def command(self, superlink_port: int) -> list[str]:
        command = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
            "--database",
            str(self.state_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]  # the venv is the runtime; no downloads
        if self.tls_dir is None:
            return command + ["--insecure"]
        ca, cert, key = self.tls_files()
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return command + (["--enable-supernode-auth"] if self.auth else [])

    def connection_toml(self, superlink_port: int) -> str:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            f"[superlink.{CONNECTION}]",
            f'address = "127.0.0.1:{superlink_port}"',
        ]
        if self.tls_dir is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{(self.tls_dir / CA_CERT).resolve()}"')
        return "\n".join(lines) + "\n"

    def environment(self) -> dict[str, str]:
        return flower_environment(self.flwr_home)


class SuperLink:
    """One supervised `flower-superlink` process."""

    def __init__(self, settings: SuperLinkSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.gateway: FleetGateway | None = None
        self.superlink_port = 0

    def start(self, ready_timeout: float = 120.0) -> None:
        settings = self.settings
        self._stop_leftovers()
        self.superlink_port = free_port()
        settings.flwr_home.mkdir(parents=True, exist_ok=True)
        (settings.flwr_home / "config.toml").write_text(settings.connection_toml(self.superlink_port))
        # Its own process group, so that stopping it also reaches the SuperExec and ServerApp it spawns.
        self.process = start_group(
            settings.command(self.superlink_port),
            settings.environment(),
            settings.state_dir / "superlink.log",
            settings.log_rotation,
        )
        self._wait_ready(ready_timeout)
        self.gateway = FleetGateway(settings.host, settings.port, self.superlink_port, settings.tls_files())
        self.gateway.start()
        log.info(
            "SuperLink up at %s (%s), pid %d, log %s",
            settings.address,
            "insecure" if settings.tls_dir is None else "TLS" + (" + robot auth" if settings.auth else ""),
            self.process.pid,
            settings.state_dir / "superlink.log",
        )

    def _stop_leftovers(self) -> None:
        """SIGKILL to the Flower services of this state directory that a coordinator killed before
        could not stop (its ServerApp outlives it); the run they served is resumed, not continued."""
        for pid in processes_with("FLWR_HOME", str(self.settings.flwr_home), FLOWER_SERVICES):
            log.warning("killing pid %d, a Flower process left by an earlier coordinator", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _wait_ready(self, timeout: float) -> None:
        """Until the SuperLink answers `flwr ls` (it accepts TCP before its APIs are served)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"flower-superlink exited with {self.process.returncode}; "
                    f"see {self.settings.state_dir / 'superlink.log'}"
                )
            if _port_open("127.0.0.1", self.superlink_port) and self.flwr("ls", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperLink at {self.settings.address} not ready after {timeout:.0f} s")
            try:
                self.process.wait(timeout=0.5)  # wakes at once if it exits; otherwise a short back-off
            except subprocess.TimeoutExpired:
                pass

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """The gateway closes; SIGTERM to the SuperLink's process group, SIGKILL after `timeout`, then
        to any leftover child."""
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.process is not None:
            stop_group(self.process, timeout)

    # -- the flwr CLI against this SuperLink -----------------------------------------------------
    def flwr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.settings.environment(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed: {(result.stdout + result.stderr).strip()[-2000:]}")
        return result

    def flwr_json(self, *args: str) -> dict:
        return json.loads(self.flwr(*args, CONNECTION, "--format", "json").stdout)

    def register_robots(self, public_keys: list[Path]) -> None:
        """Register robots' public keys (`flwr supernode register`); registered keys stay as they are.
        Each registration is a `flwr` process (~3 s to start); a fleet's keys go in side by side."""

        def register(key: Path) -> None:
            result = self.flwr("supernode", "register", str(Path(key).resolve()), CONNECTION, check=False)
            output = result.stdout + result.stderr
            if result.returncode == 0:
                log.info("registered robot key %s", key)
            elif "already in use" not in output:  # Flower's answer for a key registered before
                raise RuntimeError(f"could not register robot key {key}: {output.strip()[-1000:]}")

        with ThreadPoolExecutor(max_workers=REGISTER_PARALLEL) as pool:
            list(pool.map(register, public_keys))  # raises the first failure

    def stop_stale_runs(self) -> None:
        """Stop runs a previous coordinator left active; their state continues in a new run."""
        for run in self.flwr_json("ls").get("runs", []):
            if str(run.get("status", "")).split(":")[0] in ACTIVE_RUN_STATES:
                log.info("stopping run %s left by a previous coordinator", run["run-id"])
                self.flwr("stop", str(run["run-id"]), CONNECTION, check=False)


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False
