"""A lab on localhost for deployment-engine tests: `fedbot-coordinator` (a real SuperLink) and bare
SuperNodes of the robots (no agent), each a followed process stopped at the end."""

import os
import signal
import subprocess
from pathlib import Path

from agent.supernode import SuperNodeSettings
from fedbot.flower_processes import BIN, free_port
from fedbot.run_config import RunConfig
from fedbot.typed_config import changed_keys

from processes import Followed


class Lab:
    """The coordinator and the robots of one test, all stopped at the end."""

    def __init__(self, tmp_path: Path, fleet: Path):
        self.tmp, self.fleet = tmp_path, fleet
        self.port = free_port()
        self.state = tmp_path / "coordinator"
        self.outputs = tmp_path / "outputs"
        self.processes: list[Followed] = []

    def coordinator(
        self, *extra: str, run_config: RunConfig, name: str = "coordinator", command: str = "run"
    ) -> Followed:
        command = [
            str(BIN / "fedbot-coordinator"),
            command,
            "--state-dir",
            str(self.state),
            "--port",
            str(self.port),
            "--output-dir",
            str(self.outputs),
            "--run-config",
            changed_keys(run_config),
            *extra,
        ]
        return self._start(command, name, dict(os.environ))

    def robot(self, i: int, tls: Path | None = None, key: Path | None = None, name: str | None = None) -> Followed:
        name = name or f"robot{i}"
        settings = SuperNodeSettings(
            superlink=f"127.0.0.1:{self.port}",
            dataset_root=self.fleet / f"robot{i}",
            model_inbox=self.tmp / f"{name}-inbox",
            output_dir=self.tmp / f"{name}-outputs",
            robot_id=name,
            port=free_port(),
            root_certificates=tls / "ca.crt" if tls else None,
            auth_key=key,
        )
        return self._start(settings.command(), name, settings.environment(self.tmp / f"{name}-flwr"))

    def _start(self, command: list[str], name: str, env: dict) -> Followed:
        env = {**env, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{env['PATH']}"}
        process = Followed(command, self.tmp / f"{name}.log", env)
        self.processes.append(process)
        return process

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "FLWR_HOME": str(self.state / "flwr-home"), "PATH": f"{BIN}:{os.environ['PATH']}"}
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, timeout=120)

    def outsider_flwr(self, tls: Path, *args: str) -> subprocess.CompletedProcess:
        """`flwr` from another host of the robots' network: it knows the lab's CA and the robots' port."""
        home = self.tmp / "outsider-flwr"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n[superlink.lab]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{tls / "ca.crt"}"\n'
        )
        env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, timeout=120)

    def run_dir(self) -> Path:
        (run_dir,) = self.run_dirs()
        return run_dir

    def run_dirs(self) -> list[Path]:
        """The runs in the output dir, oldest first (beside them: the signing key)."""
        return sorted(path for path in self.outputs.iterdir() if path.is_dir())

    def close(self) -> None:
        for process in self.processes:
            process.kill_group(signal.SIGTERM if process.process.poll() is None else signal.SIGKILL)
