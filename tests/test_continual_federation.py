"""The coordinator as a service (`fedbot-coordinator serve`): run after run on real SuperLink and
SuperNode processes, each new run starting from the fleet's latest model, robots that missed a
deploy getting it when they next join, and a run without enough new data training nothing."""

import json
import signal
import subprocess
from dataclasses import replace

import pytest
from safetensors.numpy import load_file

from fedbot.flower_processes import BIN
from fedbot.model_manifest import parse_public_key, verify_model_dir
from fedbot.run_config import RunConfig

from helpers import record_wander
from lab import Lab

ONE_ROUND = RunConfig(
    num_server_rounds=1, local_steps=2, batch_size=8, eval_episodes=0, fraction_evaluate=0.0, round_timeout=300.0
)


@pytest.fixture
def lab(tmp_path):
    for robot in range(3):
        record_wander(tmp_path / "fleet" / f"robot{robot}", 2, steps=30, seed_start=10 * robot)
    lab = Lab(tmp_path, tmp_path / "fleet")
    yield lab
    lab.close()


def run_now(lab: Lab) -> None:
    command = [str(BIN / "fedbot-coordinator"), "run-now", "--state-dir", str(lab.state)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def models_in(inbox) -> list[dict]:
    return sorted(
        (json.loads((model / "manifest.json").read_text()) for model in inbox.iterdir()), key=lambda m: m["run"]
    )


def test_the_service_runs_again_from_the_fleets_model_and_robots_that_missed_it_get_it(lab, tmp_path):
    coordinator = lab.coordinator(
        "--every", "3600", "--min-new-episodes", "100", run_config=replace(ONE_ROUND, min_nodes=2), command="serve"
    )
    coordinator.wait_for(r"ready: robots can join", timeout=300)
    robots = {i: lab.robot(i) for i in (0, 1)}

    # The scheduled run at start: 4 episodes, fewer than --min-new-episodes: nothing is trained.
    coordinator.wait_for(r"4 new episodes since the last published model \(min-new-episodes 100\): no training", 300)
    coordinator.wait_for(r"run ended: finished:completed", timeout=120)
    (skipped,) = lab.run_dirs()
    assert json.loads((skipped / "state.json").read_text())["skipped"]
    skipped_registry = json.loads((skipped / "registry.json").read_text())
    assert skipped_registry["models"] == [] and set(skipped_registry["lineage"]["robots"]) == {"robot0", "robot1"}

    # run-now: trained whatever the data, from fresh weights (no model published yet), deployed to both.
    run_now(lab)
    coordinator.wait_for(r"run requested \(run-now\)", timeout=60)
    coordinator.wait_for(r"run ended: finished:completed", timeout=600)
    first = lab.run_dirs()[-1]
    first_registry = json.loads((first / "registry.json").read_text())
    assert first_registry["lineage"]["parent"] is None
    published = first_registry["models"][-1]
    assert (published["run"], published["round"]) == (first.name, 1)
    for i in (0, 1):
        assert [(m["run"], m["round"]) for m in models_in(tmp_path / f"robot{i}-inbox")] == [(first.name, 1)]

    # Robot 1 goes away; robot 0 records one more episode; robot 2, off during the deploy, joins.
    robots[1].kill_group(signal.SIGTERM)
    assert record_wander(lab.fleet / "robot0", 1, steps=30, seed_start=50) == 3
    robots[2] = lab.robot(2)
    run_now(lab)
    coordinator.wait_for(rf"catch-up deploy: {first.name} round 1 to robot2", timeout=600)
    coordinator.wait_for(r"starting from the published model .* \(3 new episodes since\)", timeout=120)
    coordinator.wait_for(r"run ended: finished:completed", timeout=600)
    assert "catch-up deploy: " + first.name + " round 1 to robot0" not in coordinator.text()

    second = lab.run_dirs()[-1]
    registry = json.loads((second / "registry.json").read_text())
    parent = registry["lineage"]["parent"]
    assert (parent["run"], parent["round"], parent["sha256"]) == (first.name, 1, published["sha256"])
    assert parent["started-from"] is True
    robots_seen = registry["lineage"]["robots"]
    assert {name: robot["episodes"] for name, robot in robots_seen.items()} == {"robot0": 3, "robot2": 2}
    assert robots_seen["robot0"]["newest_model"] == [first.name, 1] and robots_seen["robot2"]["newest_model"] is None
    # the second run's initial model is the first run's final one, weight for weight
    start = load_file(second / "global_model" / "round_0" / "model.safetensors")
    end_of_first = load_file(first / "global_model" / "round_1" / "model.safetensors")
    assert start.keys() == end_of_first.keys() and all((start[k] == end_of_first[k]).all() for k in start)

    # Robot 2 received the first run's model at the second run's start, then the second's at its end,
    # each as the coordinator signed it.
    coordinator_key = parse_public_key((lab.outputs / "signing.key.pub").read_text())
    inbox = tmp_path / "robot2-inbox"
    assert [(m["run"], m["round"]) for m in models_in(inbox)] == [(first.name, 1), (second.name, 1)]
    for model in inbox.iterdir():
        verify_model_dir(model, [coordinator_key])

    # The coordinator's view of the fleet: whom each run counted, with their data and models.
    command = [str(BIN / "fedbot-coordinator"), "status", "--output-dir", str(lab.outputs), "--json"]
    status = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout)
    assert status["runs"] == 3 and status["latest-published"] == {"run": second.name, "round": 1}
    seen = status["robots"]
    assert {name: (r["last-seen"], r["episodes"], r["rounds-trained"]) for name, r in seen.items()} == {
        "robot0": (second.name, 3, 2),
        "robot1": (first.name, 2, 1),
        "robot2": (second.name, 2, 1),
    }
    assert seen["robot1"]["newest-model"] is None and seen["robot0"]["newest-model"] == [first.name, 1]
