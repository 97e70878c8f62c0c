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
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from agent.supernode import ensure_auth_key
from coordinator.credentials import make_server_certificate
from coordinator.superlink import FLOWER_SERVICES
from fedbot.flower_processes import PROJECT
from fedbot.process_group import processes_with
from fedbot.run_config import RunConfig

from helpers import assert_replies_hold_no_data, record_wander
from lab import Lab
from processes import group_alive

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
    # nor the ServerApp the killed coordinator's SuperLink had started (it outlived them both)
    assert processes_with("FLWR_HOME", str(lab.state.resolve() / "flwr-home"), FLOWER_SERVICES) == []
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
    coordinator = lab.coordinator("--app", str(app), run_config=replace(TINY_RUN, min_nodes=1, round_timeout=10.0))
    coordinator.wait_for(r"ready: robots can join", timeout=300)
    robot = lab.robot(0)
    assert coordinator.wait(timeout=600) != 0
    assert "no robot sent its statistics" in coordinator.text()
    assert "refused a ClientApp of a run whose app" in robot.text()
    assert not marker.exists()
