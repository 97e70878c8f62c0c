"""The deployment engine on localhost: `fedbot-coordinator` (a real SuperLink) and real SuperNodes.

Insecure: three robots, one killed mid-round; the run finishes with the other two, `flwr ls` and
`flwr log` answer, and every reply a robot sent holds weights, summaries and metrics only.
Production: TLS + SuperNode authentication; an unregistered robot is refused; the coordinator is
killed after round 1 and, restarted, continues at round 2 (FedAdam's moments restored).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.supernode import SuperNodeSettings
from coordinator.credentials import ensure_robot_key, make_server_certificate
from fedbot.presets import get_preset
from fedbot.training import open_dataset
from helpers import record_wander
from processes import Followed, free_port, group_alive

BIN = Path(sys.executable).parent
TINY_RUN = "num-server-rounds=2 local-steps=2 batch-size=8 eval-episodes=1 eval-every=2 round-timeout=300.0"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three robots' datasets (two short episodes each, different seeds)."""
    root = tmp_path_factory.mktemp("fleet")
    for robot in range(3):
        record_wander(root / f"robot{robot}", 2, steps=40, seed_start=10 * robot)
    return root


class Lab:
    """The coordinator and the robots of one test, all stopped at the end."""

    def __init__(self, tmp_path: Path, fleet: Path):
        self.tmp, self.fleet = tmp_path, fleet
        self.port = free_port()
        self.state = tmp_path / "coordinator"
        self.outputs = tmp_path / "outputs"
        self.processes: list[Followed] = []

    def coordinator(self, *extra: str, run_config: str = TINY_RUN, name: str = "coordinator") -> Followed:
        command = [str(BIN / "fedbot-coordinator"), "run", "--state-dir", str(self.state), "--port", str(self.port),
                   "--output-dir", str(self.outputs), "--run-config", run_config, *extra]
        return self._start(command, name, dict(os.environ))

    def robot(self, i: int, tls: Path | None = None, key: Path | None = None, name: str | None = None) -> Followed:
        name = name or f"robot{i}"
        settings = SuperNodeSettings(
            superlink=f"127.0.0.1:{self.port}", dataset_root=self.fleet / f"robot{i}",
            model_inbox=self.tmp / f"{name}-inbox", output_dir=self.tmp / f"{name}-outputs", robot_id=name,
            port=free_port(), root_certificates=tls / "ca.crt" if tls else None, auth_key=key,
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

    def run_dir(self) -> Path:
        (run_dir,) = self.outputs.iterdir()
        return run_dir

    def close(self) -> None:
        for process in self.processes:
            process.kill_group(signal.SIGTERM if process.process.poll() is None else signal.SIGKILL)


@pytest.fixture
def lab(tmp_path, fleet):
    lab = Lab(tmp_path, fleet)
    yield lab
    lab.close()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_robot_does_not_hang_the_run_and_replies_hold_no_data(lab, fleet):
    coordinator = lab.coordinator(run_config=TINY_RUN + " min-nodes=3")
    robots = [lab.robot(i) for i in range(3)]
    coordinator.wait_for(r"round 1: training on 3 robots", timeout=300)
    robots[2].kill_group(signal.SIGKILL)  # the SuperNode, its SuperExec and the ClientApp in training

    coordinator.wait_for(r"round 1: \{", timeout=300)
    runs = json.loads(lab.flwr("ls", "fedbot", "--format", "json").stdout)["runs"]
    (run,) = runs
    assert run["status"] == "running"
    shown = lab.flwr("log", run["run-id"], "fedbot", "--show")
    assert "round 1: training on 3 robots" in shown.stdout

    assert coordinator.wait(timeout=600) == 0, coordinator.text()[-3000:]
    log = coordinator.text()
    assert "round 1 training: a robot failed" in log
    rows = metrics(lab.run_dir())
    assert [r["round"] for r in rows] == [1, 2]
    assert (rows[0]["robots"], rows[0]["failed"]) == (2, 1)
    assert rows[1]["robots"] == 2

    # Privacy: every reply, as the coordinator received it, holds only weights, summaries, metrics.
    dataset = open_dataset(fleet / "robot0")
    from fedbot.training import new_policy

    policy = new_policy(get_preset("pusht-state"), dataset, device="cpu").policy
    params = {name: list(p.shape) for name, p in policy.named_parameters() if p.requires_grad}
    replies = [json.loads(line) for line in (lab.run_dir() / "replies.jsonl").read_text().splitlines()]
    kinds = {}
    for reply in replies:
        what, content = reply["what"].split(" ")[-1], reply["content"]
        kinds.setdefault(what, set()).add(tuple(sorted(content)))
        for name, record in content.items():
            if record["kind"] == "arrays" and name == "arrays":
                assert {k: a["shape"] for k, a in record["arrays"].items()} == params
            elif record["kind"] == "arrays":
                assert name == "stats"
                for key, array in record["arrays"].items():
                    feature, stat = key.split("::")
                    assert stat in ("count", "mean", "std", "min", "max")
                    assert array["shape"] == ([1] if stat == "count" else list(dataset.meta.features[feature]["shape"]))
            else:
                assert record["kind"] in ("MetricRecord", "ConfigRecord")
                assert set(record["values"].values()) <= {"int", "float", "str"}
    assert kinds == {"statistics": {("info", "stats")}, "training": {("arrays", "metrics")},
                     "evaluation": {("metrics",)}, "deploy": {("deployed",)}}


def test_tls_auth_refuses_strangers_and_a_killed_coordinator_resumes(lab, tmp_path):
    tls = tmp_path / "tls"
    make_server_certificate(tls, ["127.0.0.1"])
    keys = {name: ensure_robot_key(tls, name) for name in ("robot0", "robot1", "stranger")}
    secure = ["--tls", str(tls), "--auth", "--register", str(keys["robot0"]), str(keys["robot1"])]
    run_config = TINY_RUN + " strategy='fedadam'"
    coordinator = lab.coordinator(*secure, run_config=run_config)
    up = coordinator.wait_for(r"SuperLink up .* \(TLS \+ robot auth\), pid (\d+)", timeout=300)
    coordinator.wait_for(r"ready: robots can join", timeout=300)  # their keys are registered now
    robots = [lab.robot(i, tls, keys[f"robot{i}"].with_suffix("")) for i in range(2)]
    stranger = lab.robot(2, tls, keys["stranger"].with_suffix(""), name="stranger")
    assert stranger.wait(timeout=300) != 0
    assert "Failed to activate SuperNode" in stranger.text()

    coordinator.wait_for(r"round 1: \{", timeout=600)
    coordinator.kill_group(signal.SIGKILL)  # the coordinator dies; its SuperLink must follow it

    # Its SuperLink followed it (else the new one could not take the port); nothing of it is left.
    restarted = lab.coordinator(*secure, run_config=run_config, name="coordinator-restarted")
    assert restarted.wait(timeout=600) == 0, restarted.text()[-3000:]
    log = restarted.text()
    assert "continuing after round 1" in log and "restored m_t of FedAdam" in log
    run_dir = lab.run_dir()
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
    registry = json.loads((run_dir / "registry.json").read_text())
    assert [(m["round"], m["parent"]) for m in registry["models"]] == [(0, None), (1, 0), (2, 1)]
    for i in range(2):
        assert list((tmp_path / f"robot{i}-inbox").iterdir())
    assert all(r.process.poll() is None for r in robots)  # the robots rode out the restart
    assert not group_alive(int(up.group(1)))
