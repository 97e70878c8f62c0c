"""The deployment engine on localhost: `fedbot-coordinator` (a real SuperLink) and real SuperNodes.

One production scenario (each ClientApp message costs a process start of ~15 s on 2 cores, so the
checks share one run): TLS + SuperNode authentication with an unregistered robot refused; three
robots, one SIGKILLed mid-round, the round finishing with the other two; `flwr ls` and `flwr log`
against the coordinator's SuperLink; the coordinator SIGKILLed after round 1 and, restarted,
continuing at round 2 with FedAdam's moments; and every reply holding weights, summaries and
metrics only, the robots' updates travelling in float16. The insecure (local development) mode runs
in bench/bench_round_overhead.py.
"""

import json
import os
import shutil
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from agent.supernode import SuperNodeSettings, ensure_auth_key
from coordinator.credentials import make_server_certificate
from fedbot.flower_processes import BIN, PROJECT, free_port
from fedbot.run_config import RunConfig
from fedbot.typed_config import changed_keys

from helpers import assert_replies_hold_no_data, record_wander
from processes import Followed, group_alive

TINY_RUN = RunConfig(
    num_server_rounds=2, local_steps=2, batch_size=8, eval_episodes=1, eval_every=2, round_timeout=300.0
)


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

    def coordinator(self, *extra: str, run_config: RunConfig = TINY_RUN, name: str = "coordinator") -> Followed:
        command = [
            str(BIN / "fedbot-coordinator"),
            "run",
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
        (run_dir,) = [path for path in self.outputs.iterdir() if path.is_dir()]  # beside it: the signing key
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


def test_production_run_survives_a_dead_robot_and_a_dead_coordinator(lab, tmp_path, fleet):
    """TLS + robot authentication, a refused stranger, a robot SIGKILLed mid-round, `flwr ls`/`flwr log`,
    the coordinator SIGKILLed after round 1 and restarted, and an audit of every reply."""
    tls = tmp_path / "tls"
    make_server_certificate(tls, ["127.0.0.1"])
    # each robot makes its own key (fedbot-agent --keygen); only the public halves reach the coordinator
    keys = {
        name: ensure_auth_key(tmp_path / name / "supernode.key") for name in ("robot0", "robot1", "robot2", "stranger")
    }
    secure = ["--tls", str(tls), "--auth", "--register", *(str(keys[f"robot{i}"]) for i in range(3))]
    # robot evaluation: test_federation_sim. float16: weights out, updates back, float32 global model
    run_config = replace(TINY_RUN, strategy="fedadam", fraction_evaluate=0.0, weights_dtype="float16")
    coordinator = lab.coordinator(*secure, run_config=replace(run_config, min_nodes=3))
    up = coordinator.wait_for(r"SuperLink up .* \(TLS \+ robot auth\), pid (\d+)", timeout=300)
    coordinator.wait_for(r"ready: robots can join", timeout=300)  # their keys are registered now
    robots = [lab.robot(i, tls, keys[f"robot{i}"].with_suffix("")) for i in range(3)]
    stranger = lab.robot(0, tls, keys["stranger"].with_suffix(""), name="stranger")
    assert stranger.wait(timeout=300) != 0
    assert "Failed to activate SuperNode" in stranger.text()

    coordinator.wait_for(r"round 1: training on 3 robots", timeout=600)
    robots[2].kill_group(signal.SIGKILL)  # the SuperNode, its SuperExec and the ClientApp in training
    (run,) = json.loads(lab.flwr("ls", "fedbot", "--format", "json").stdout)["runs"]  # while the round waits
    assert run["status"] == "running"
    assert "round 1: training on 3 robots" in lab.flwr("log", run["run-id"], "fedbot", "--show").stdout
    # From the robots' port, the Control API is not there: no listing, no stopping, no key registration.
    for attempt in (
        ("ls", "lab"),
        ("stop", run["run-id"], "lab"),
        ("supernode", "register", str(keys["stranger"]), "lab"),
    ):
        assert lab.outsider_flwr(tls, *attempt).returncode != 0, attempt
    assert "refused POST /v1/control/" in coordinator.text()
    coordinator.wait_for(r"round 1: \{", timeout=600)  # Flower declares robot2 dead after ~60 s
    coordinator.kill_group(signal.SIGKILL)  # the coordinator dies; its SuperLink must follow it
    assert "round 1 training: a robot failed" in coordinator.text()

    # Killed while it appended a metrics row: a line cut short. Restarted by its operator: it waits
    # a bounded time for the 3 robots, then goes on with the 2 that are there. Its old SuperLink is
    # gone (else the new one could not take the port) and leaves nothing behind.
    with open(lab.run_dir() / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "robots": 2, "fai')
    restarted = lab.coordinator(
        *secure, run_config=replace(run_config, min_nodes=3, robot_wait_seconds=20.0), name="coordinator-restarted"
    )
    assert restarted.wait(timeout=900) == 0, restarted.text()[-3000:]
    assert not group_alive(int(up.group(1)))
    log = restarted.text()
    assert "continuing after round 1" in log and "restored m_t of FedAdam" in log
    assert "going on with 2 of 3 robots" in log and "not a whole row" in log
    run_dir = lab.run_dir()
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert (rows[0]["robots"], rows[0]["failed"]) == (2, 1) and rows[1]["robots"] == 2
    registry = json.loads((run_dir / "registry.json").read_text())
    assert [(m["round"], m["parent"]) for m in registry["models"]] == [(0, None), (1, 0), (2, 1)]
    for i in range(2):
        (deployed,) = (tmp_path / f"robot{i}-inbox").iterdir()
        assert json.loads((deployed / "manifest.json").read_text())["sha256"] == registry["models"][-1]["sha256"]
    assert all(r.process.poll() is None for r in robots[:2])  # the robots rode out the restart
    assert_replies_hold_no_data(run_dir, fleet / "robot0", evaluation=False)
    updates = [
        json.loads(line)["content"]["arrays"]["arrays"]
        for line in (run_dir / "replies.jsonl").open()
        if "training" in json.loads(line)["what"]
    ]
    assert len(updates) >= 4 and all(a["dtype"] == "float16" for update in updates for a in update.values())


def test_a_run_with_no_robot_stops_after_its_wait_with_the_reason(lab):
    coordinator = lab.coordinator(run_config=replace(TINY_RUN, robot_wait_seconds=3.0))
    assert coordinator.wait(timeout=300) != 0
    assert "no robot connected within 3 s (robot-wait-seconds)" in coordinator.text()


def test_robots_refuse_a_run_of_any_app_but_the_installed_fedbot(lab, tmp_path):
    """Someone submits a run of a modified app whose ClientApp would write a marker file: every
    robot refuses its messages, so that code never runs, and the run fails."""
    app = tmp_path / "modified-app"
    shutil.copytree(PROJECT, app, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "data", "__pycache__"))
    marker = tmp_path / "marker"
    with open(app / "agent" / "client_app.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()  # not fedbot's code\n")
    coordinator = lab.coordinator("--app", str(app), run_config=replace(TINY_RUN, min_nodes=1, round_timeout=30.0))
    coordinator.wait_for(r"ready: robots can join", timeout=300)
    robot = lab.robot(0)
    assert coordinator.wait(timeout=600) != 0
    assert "no robot sent its statistics" in coordinator.text()
    assert "refused a ClientApp of a run whose app" in robot.text()
    assert not marker.exists()
