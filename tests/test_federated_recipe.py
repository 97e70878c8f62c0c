"""The training recipe in a federation: the coordinator's global model is the EMA of the robots'
aggregates, moved once a round exactly as training with the EMA would move it over the round's steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from coordinator.registry import RunDirectory
from coordinator.server_app import AGGREGATE, RunState, loaded_stats
from fedbot.policy_io import load_policy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import ema_decay_over, new_ema
from fedbot.transfer import weights_vector


def test_a_rounds_decay_is_what_per_step_ema_keeps_over_the_rounds_steps():
    old, new = torch.zeros(5), torch.ones(5)
    parameter = torch.nn.Parameter(old.clone())
    ema = new_ema(torch.nn.Linear(1, 1), 0.75)  # the recipe's EMA, stepped as TrainState steps it
    ema.shadow_params = [old.clone()]
    ema.optimization_step = 200  # the round starts after 200 steps
    with torch.no_grad():
        parameter.copy_(new)  # the weights jump at the round's start and stay there
    for _ in range(50):
        ema.step([parameter])
    keep = ema_decay_over(200, 50, 0.75)
    assert 0.2 < keep < 0.9  # neither nothing nor everything: the test can tell them apart
    torch.testing.assert_close(ema.shadow_params[0], keep * old + (1 - keep) * new)


def test_the_global_model_moves_towards_each_aggregate_and_robots_train_from_the_aggregate(untrained_policy, tmp_path):
    run = RunConfig(local_steps=40, output_dir=str(tmp_path))
    assert get_preset(run.preset).ema_power > 0  # the default recipe has an EMA
    loaded = load_policy(untrained_policy, "cpu")
    state = RunState.of(run, RunDirectory.open(run), loaded, loaded_stats(loaded), None)
    start = weights_vector(loaded.policy).numpy()
    ((key, _),) = state.arrays.items()
    aggregate = start + np.linspace(-1, 1, start.size, dtype=np.float32)
    state.follow(ArrayRecord({key: Array(aggregate)}), server_round=3)

    keep = ema_decay_over(run.first_step(3), run.local_steps, get_preset(run.preset).ema_power)
    np.testing.assert_allclose(weights_vector(loaded.policy).numpy(), keep * start + (1 - keep) * aggregate, atol=1e-6)
    (sent,) = state.arrays.values()
    np.testing.assert_array_equal(sent.numpy(), aggregate)  # the next round starts from the aggregate
    saved = state.saved_state()  # a resumed run gets the aggregate back, not the EMA
    np.testing.assert_array_equal(saved[f"{AGGREGATE}/{key}"], aggregate)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(weights_vector(loaded.policy).numpy(), aggregate, atol=1e-3)
