"""A federated run on Flower's simulation engine: a real SuperLink, `flwr run .`, two virtual robots."""

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedbot.flower_processes import simulation_run, simulation_superlink
from fedbot.model_manifest import sha256_file
from fedbot.policy_io import load_policy
from fedbot.run_config import RunConfig
from fedbot.typed_config import changed_keys

from arm_bench import record_arm_dataset
from helpers import assert_replies_hold_no_data, record_wander


@pytest.fixture
def superlink(tmp_path):
    """A simulation SuperLink on a free port, and a FLWR_HOME whose default connection is it."""
    with simulation_superlink(tmp_path / "flwr-home") as env:
        yield env


def run_on_virtual_robots(env: dict, fleet: Path, out: Path, run: RunConfig, robots: int = 2) -> tuple[Path, str]:
    """`flwr run` of this app on `robots` virtual SuperNodes training on <fleet>/robot<i>; returns the
    run's directory under `out` and what the run printed. Flower's exit status alone does not show a
    failed ServerApp: callers check the run's own files."""
    run_config = changed_keys(replace(run, sim_data_dir=str(fleet), output_dir=str(out)))
    result = subprocess.run(
        simulation_run(run_config, robots, cpus_per_robot=1, stage=out.parent / "app"),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = [path for path in out.iterdir() if path.is_dir()]  # beside it: the signing key
    return run_dir, result.stdout


def test_two_robots_federate_evaluate_and_receive_the_model(tmp_path, superlink):
    fleet, out = tmp_path / "fleet", tmp_path / "outputs"
    for robot in range(2):
        record_wander(fleet / f"robot{robot}", 2, steps=40, seed_start=10 * robot)
    run_dir, log = run_on_virtual_robots(
        superlink,
        fleet,
        out,
        # Differential privacy on: every robot clips its update to norm 0.01 (the learning rate makes
        # the unclipped ones 30-110 times larger), the coordinator adds noise to the aggregate.
        RunConfig(
            num_server_rounds=2,
            local_steps=2,
            batch_size=8,
            eval_episodes=1,
            round_timeout=600.0,
            lr=0.1,
            dp_noise_multiplier=1e-3,
            dp_clipping_norm=0.01,
        ),
    )

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["robots"] == 2 and r["failed"] == 0 and r["train-loss"] > 0 for r in rows)
    norms = [robot["update-norm"] for r in rows for robot in r["per-robot"]]
    assert len(norms) == 4 and all(0.0099 < norm < 0.0101 for norm in norms), norms  # clipped, float16 on the way
    assert all(r["bytes-received"] > 0 and 0.0 <= r["server-success-rate"] <= 1.0 for r in rows)
    assert (run_dir / "metrics.png").stat().st_size > 0
    assert list((run_dir / "evaluate" / "round_2" / "server").glob("rollout_*.mp4"))
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True

    registry = json.loads((run_dir / "registry.json").read_text())
    assert [m["round"] for m in registry["models"]] == [0, 1, 2] and registry["latest"] == 2
    for manifest in registry["models"]:
        model = run_dir / "global_model" / f"round_{manifest['round']}"
        assert sha256_file(model / "model.safetensors") == manifest["sha256"]
    final = registry["models"][-1]
    assert final["parent"] == 1

    for robot in range(2):
        (deployed,) = (fleet / f"robot{robot}-inbox").iterdir()
        manifest = json.loads((deployed / "manifest.json").read_text())
        assert manifest["sha256"] == final["sha256"] == sha256_file(deployed / "model.safetensors")
        load_policy(deployed, device="cpu")
        assert list((fleet / f"robot{robot}-outputs" / "evaluate" / "round_2").glob("rollout_*.mp4"))
        # Adam's moments outlived round 1 on the robot's disk: its step count is 2 rounds x 2 local steps
        (optimizer,) = (fleet / f"robot{robot}-outputs" / "optimizer").iterdir()
        saved = torch.load(optimizer, weights_only=True)["optimizer"]["state"]
        assert {int(param["step"]) for param in saved.values()} == {4}
    assert_replies_hold_no_data(run_dir, fleet / "robot0", evaluation=True)


def test_arms_federate_without_a_simulator(tmp_path, superlink):
    """so-arm-image: SO arm datasets (joints + a camera) train and receive the model; no simulator
    exists for them, so rounds are not evaluated."""
    fleet, out = tmp_path / "fleet", tmp_path / "outputs"
    for robot in range(2):
        assert record_arm_dataset(tmp_path / f"bench{robot}", fleet / f"robot{robot}", 2) == 2
    # A third arm whose camera gives smaller frames: refused by name, with the difference.
    assert record_arm_dataset(tmp_path / "bench2", fleet / "robot2", 2, camera_size=(32, 48)) == 2
    run_dir, log = run_on_virtual_robots(
        superlink,
        fleet,
        out,
        RunConfig(preset="so-arm-image", num_server_rounds=1, local_steps=2, batch_size=4, round_timeout=600.0),
        robots=3,
    )
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["robots"] == 2 and row["failed"] == 0 and row["train-loss"] > 0
    assert not (fleet / "robot2-inbox").exists()  # no model for a robot the run refused
    assert "robot robot2 refused for this run: its features differ from the run's: observation.images.front" in log
    assert not any(key.startswith(("server-", "client-")) for key in row)  # nothing was evaluated
    assert not (run_dir / "evaluate").exists()
    for robot in range(2):
        (deployed,) = (fleet / f"robot{robot}-inbox").iterdir()
        features = load_policy(deployed, device="cpu").policy.config.input_features
        assert features["observation.state"].shape == (6,) and "observation.images.front" in features
