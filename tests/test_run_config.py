"""The federation's run config: pyproject's defaults are RunConfig's, bad values name their key, and
configs written from the typed class read back as the same config through Flower's own parser."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import parse_config_args
from safetensors.numpy import load_file, save_file

from coordinator.server_app import make_strategy, restore_strategy_state, strategy_state
from fedbot.policy_io import load_policy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import TrainState
from fedbot.typed_config import ConfigError, changed_keys

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyprojects_run_config_is_runconfigs_defaults():
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(defaults) == RunConfig()


def test_a_run_config_written_from_the_class_reads_back_the_same_through_flower():
    config = RunConfig(num_server_rounds=7, strategy="fedprox", lr=3e-4, output_dir="/srv/runs", eval_episodes=0)
    parsed = parse_config_args([changed_keys(config)])
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config({**defaults, **parsed}) == config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("strategy", "fedsgd", "key 'strategy' must be one of"),
        ("local-steps", 0, "key 'local-steps' must be >= 1"),
        ("lr", -1.0, "key 'lr' must be >= 0"),
        ("eval-episodes", -1, "key 'eval-episodes' must be >= 0"),
        ("batch-size", "64", "key 'batch-size' must be int"),
        ("server-momentum", 1.0, "key 'server-momentum' must lie in"),
        ("server-lr", -0.1, "key 'server-lr' must lie in"),
        ("no-such-key", 1, "unknown key 'no-such-key'"),
    ],
)
def test_a_bad_run_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({key: value})


def test_a_robot_joining_late_trains_on_the_runs_schedule(untrained_policy):
    """The learning rate spans the whole run: a robot's first round 3 starts where a robot that
    trained every round is, not at the schedule's start."""
    run = RunConfig(num_server_rounds=4, local_steps=150)
    assert run.total_steps == 600 and [run.first_step(r) for r in (1, 3)] == [0, 300]
    every_round = TrainState.create(load_policy(untrained_policy, "cpu"), run.total_steps)
    rates = []
    for _ in range(run.total_steps):
        rates.append(every_round.optimizer.param_groups[0]["lr"])
        every_round.optimizer.step()
        every_round.scheduler.step()
    late = TrainState.create(load_policy(untrained_policy, "cpu"), run.total_steps)
    late.seek(run.first_step(3))
    assert late.optimizer.param_groups[0]["lr"] == pytest.approx(rates[300], rel=1e-9)
    assert rates[0] < rates[300] and rates[300] != rates[0]  # it is a schedule, not a constant
    assert max(rates) == pytest.approx(get_preset(run.preset).config["optimizer_lr"])  # lr 0: the preset's peak


def test_fedavgm_takes_the_run_configs_server_optimizer_and_a_resumed_run_its_momentum(tmp_path):
    run = RunConfig(strategy="fedavgm", server_momentum=0.9)
    strategy = make_strategy(run)
    assert (strategy.server_learning_rate, strategy.server_momentum) == (1.0, 0.9)  # server-lr 0: FedAvgM's own
    assert make_strategy(RunConfig(strategy="fedadam")).eta == 0.01
    strategy.momentum_vector = [np.full(3, i, np.float32) for i in range(12)]  # more than 10: order by index
    save_file(strategy_state(strategy), str(tmp_path / "state.safetensors"))  # as the run directory keeps it
    resumed = make_strategy(run)
    restore_strategy_state(resumed, load_file(str(tmp_path / "state.safetensors")))
    assert [v[0] for v in resumed.momentum_vector] == list(range(12))
