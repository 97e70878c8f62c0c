"""The federation's run config: pyproject's defaults are RunConfig's, bad values name their key, and
configs written from the typed class read back as the same config through Flower's own parser."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

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
