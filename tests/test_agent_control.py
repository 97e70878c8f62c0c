"""The live controller: the control loop runs a policy on the sim robot, swaps policies between
ticks while it runs, holds when the policy fails or its actions are unsafe (and says which model
failed), and keeps ticking while paused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lerobot.utils.constants import OBS_STATE

from agent.action_checks import UnsafeActions, safe_actions
from agent.controller import HOLD, ControlLoop
from fedbot.policy_io import load_policy
from hardware.pusht_sim import PushTSim, PushTSimConfig

MAX_STEPS = 25


@pytest.fixture()
def sim_loop():
    robot = PushTSim(PushTSimConfig(id="control", max_episode_steps=MAX_STEPS))
    robot.connect()
    threads = torch.get_num_threads()
    loop = ControlLoop(robot, rate_hz=50.0)  # sets torch to one thread, as in the agent
    loop.start()
    yield loop
    loop.close()
    robot.disconnect()
    torch.set_num_threads(threads)


def test_runs_policy_episodes_and_reports_them(sim_loop, untrained_policy):
    ticket = sim_loop.swap(load_policy(untrained_policy, "cpu"), "model-a", 0.0)
    assert ticket.done.wait(30)
    run = sim_loop.run(episodes=2, seed=100_000)
    assert run.finished.wait(120)
    assert [r["seed"] for r in run.results] == [100_000, 100_001]
    assert all(r["model"] == "model-a" for r in run.results)
    assert sim_loop.mode == HOLD
    # An untrained policy succeeds at neither: each episode ran its 25 actions, then the loop held
    # with the robot where the second episode left it.
    assert [r["success"] for r in run.results] == [False, False]
    assert sim_loop.actions == 2 * MAX_STEPS
    status = sim_loop.robot.episode_status()
    assert status.done and run.results[-1]["coverage"] == status.coverage
    position = agent_position(sim_loop)
    assert sim_loop.wait_ticks(5, timeout=10)
    assert sim_loop.actions == 2 * MAX_STEPS
    np.testing.assert_array_equal(agent_position(sim_loop), position)


def test_swap_while_running_takes_effect_between_ticks(sim_loop, untrained_policy):
    sim_loop.swap(load_policy(untrained_policy, "cpu"), "model-a", 0.0).done.wait(30)
    run = sim_loop.run(episodes=3, seed=100_000)
    second = load_policy(untrained_policy, "cpu")
    ticket = sim_loop.swap(second, "model-b", 0.0)
    assert ticket.done.wait(60)  # set at the first action computed by model-b's weights
    assert ticket.latency is not None and ticket.installed_tick >= 0
    assert sim_loop.inference.policy is second and sim_loop.live_name == "model-b"
    assert run.finished.wait(180)
    assert run.results[-1]["model"] == "model-b"


def test_a_failing_policy_makes_the_loop_hold_and_keep_ticking(sim_loop, untrained_policy):
    loaded = load_policy(untrained_policy, "cpu")

    def broken(batch, noise=None):
        raise RuntimeError("CUDA error: device lost")

    loaded.policy.predict_action_chunk = broken
    sim_loop.swap(loaded, "broken", 0.0).done.wait(30)
    run = sim_loop.run(episodes=1, seed=100_000)  # resets the robot to scene 100000
    assert run.finished.wait(30)
    assert sim_loop.wait_ticks(3, timeout=10)  # the loop goes on ticking (and feeding the watchdog)
    assert sim_loop.mode == HOLD
    assert "device lost" in sim_loop.error
    assert sim_loop.healthy()
    # no action was sent: the agent stands where scene 100000 put it, and no episode was reported
    assert sim_loop.actions == 0 and run.results == []
    np.testing.assert_array_equal(agent_position(sim_loop), scene_start(100_000))


@pytest.mark.parametrize("value, reason", [(float("nan"), "not finite"), (1e4, "out of range")])
def test_a_model_with_unsafe_actions_is_reported_and_none_of_them_reaches_the_robot(
    sim_loop, untrained_policy, value, reason
):
    loaded = load_policy(untrained_policy, "cpu")
    steps = loaded.policy.config.n_action_steps

    def unsafe(batch, noise=None):  # in the policy's normalized units, before the postprocessor
        return torch.full((1, steps, 2), value)

    loaded.policy.predict_action_chunk = unsafe
    np.testing.assert_array_equal(np.stack(sim_loop.robot.action_bounds), [[0, 0], [512, 512]])
    failures = []
    sim_loop.on_policy_failure = lambda model, why: failures.append((model, why))
    sim_loop.swap(loaded, "unsafe", 0.0).done.wait(30)
    run = sim_loop.run(episodes=1, seed=100_000)
    assert run.finished.wait(30)
    assert sim_loop.mode == HOLD and sim_loop.actions == 0 and run.results == []
    np.testing.assert_array_equal(agent_position(sim_loop), scene_start(100_000))
    assert len(failures) == 1 and failures[0][0] == "unsafe" and reason in failures[0][1]
    assert sim_loop.error.startswith("model unsafe failed at run time: ") and reason in sim_loop.error


def test_actions_just_outside_the_bounds_are_clipped_and_beyond_the_tolerance_refused():
    bounds = (np.zeros(2), np.full(2, 512.0))  # PushT's action space
    chunk = np.array([[-10.0, 520.0], [100.0, 200.0]], dtype=np.float32)
    clipped = safe_actions(chunk, bounds)
    assert clipped.dtype == np.float32
    np.testing.assert_array_equal(clipped, [[0.0, 512.0], [100.0, 200.0]])
    with pytest.raises(UnsafeActions, match=r"1 of 4 action values out of range: action 1 axis 0 is 600"):
        safe_actions(np.array([[0.0, 0.0], [600.0, 0.0]]), bounds)
    with pytest.raises(UnsafeActions, match="1 of 2 action values are not finite"):
        safe_actions(np.array([[np.inf, 0.0]]), None)
    assert PushTSim(PushTSimConfig(id="bounds")).action_bounds is None  # known once connected


def test_paused_loop_leaves_the_robot_alone(sim_loop, untrained_policy):
    sim_loop.swap(load_policy(untrained_policy, "cpu"), "model-a", 0.0).done.wait(30)
    sim_loop.run()
    assert wait_for_actions(sim_loop, 3)  # the policy drives the robot ...
    sim_loop.pause()
    actions, position = sim_loop.actions, agent_position(sim_loop)
    assert sim_loop.wait_ticks(5, timeout=10)  # ... and, paused, no longer: the agent stays put
    assert sim_loop.actions == actions
    np.testing.assert_array_equal(agent_position(sim_loop), position)


def agent_position(loop: ControlLoop) -> np.ndarray:
    return loop.robot.get_observation()[OBS_STATE]


def scene_start(seed: int) -> np.ndarray:
    """Where a fresh sim robot's agent stands in scene `seed`."""
    robot = PushTSim(PushTSimConfig(id="reference"))
    robot.connect()
    try:
        robot.reset(seed)
        return robot.get_observation()[OBS_STATE]
    finally:
        robot.disconnect()


def wait_for_actions(loop: ControlLoop, count: int, ticks: int = 3000) -> bool:
    """Follow the loop tick by tick until it has sent `count` actions (False after `ticks` ticks)."""
    for _ in range(ticks):
        if loop.actions >= count:
            return True
        if not loop.wait_ticks(1, timeout=10):
            return False
    return loop.actions >= count
