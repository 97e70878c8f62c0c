"""The scripted PushT operator: deterministic, smooth, within reach, successful, styles that differ."""

from __future__ import annotations

import numpy as np
import pytest
from lerobot.teleoperators.config import TeleoperatorConfig

from hardware.pusht_expert import (
    MAX_REACH,
    MAX_TARGET_STEP,
    STYLES,
    PushTExpert,
    PushTExpertConfig,
    get_style,
)
from hardware.pusht_sim import PushTSim, PushTSimConfig


@pytest.fixture(scope="module")
def robot():
    robot = PushTSim(PushTSimConfig())
    robot.connect()
    yield robot
    robot.disconnect()


def make_operator(robot: PushTSim, tmp_path_factory, style: str = "default") -> PushTExpert:
    op = PushTExpert(PushTExpertConfig(style=style, calibration_dir=tmp_path_factory.mktemp("calib")))
    op.connect()
    op.attach(robot)
    return op


def run(robot: PushTSim, op: PushTExpert, seed: int, max_steps: int = 300):
    """Play one episode; return actions, agent positions when each was chosen, and the final status."""
    robot.reset(seed)
    op.start_episode()
    actions, agents = [], []
    for _ in range(max_steps):
        agents.append(np.asarray(robot.env.agent.position, dtype=np.float64))
        action = op.get_action()["action"]
        assert action.dtype == np.float32 and action.shape == (2,)
        actions.append(action.copy())
        robot.send_action({"action": action})
        status = robot.episode_status()
        if status.done:
            break
    return np.array(actions), np.array(agents), status


@pytest.fixture(scope="module")
def episodes(robot, tmp_path_factory):
    """Default-style episodes on seeds 0..2, played once for several tests."""
    op = make_operator(robot, tmp_path_factory)
    return {seed: run(robot, op, seed) for seed in (0, 1, 2)}


def test_config_is_registered():
    assert TeleoperatorConfig.get_choice_class("pusht_expert") is PushTExpertConfig
    assert PushTExpertConfig().type == "pusht_expert"


def test_unknown_style_raises():
    with pytest.raises(ValueError, match="default"):
        PushTExpert(PushTExpertConfig(style="no-such-style"))
    with pytest.raises(ValueError, match="known styles"):
        get_style("no-such-style")


def test_features(robot, tmp_path_factory):
    op = make_operator(robot, tmp_path_factory)
    assert op.action_features == {"action": (2,)}
    assert op.feedback_features == {}
    assert op.is_connected and op.is_calibrated
    op.disconnect()
    assert not op.is_connected


def test_episodes_succeed(episodes):
    for seed, (_, _, status) in episodes.items():
        assert status.success, f"seed {seed}: coverage {status.coverage:.3f}"


def test_targets_are_smooth_within_reach_and_bounds(episodes):
    for actions, agents, _ in episodes.values():
        steps = np.hypot(*np.diff(actions, axis=0).T)
        assert steps.max() <= MAX_TARGET_STEP + 1e-3
        reach = np.hypot(*(actions - agents).T)
        assert reach.max() <= MAX_REACH + 1e-3
        assert actions.min() >= 0.0 and actions.max() <= 512.0
        # The first target is where the agent already is: no jump at the start either.
        assert np.hypot(*(actions[0] - agents[0])) <= MAX_TARGET_STEP + 1e-3


def test_deterministic(robot, episodes, tmp_path_factory):
    actions, _, _ = episodes[1]
    again, _, _ = run(robot, make_operator(robot, tmp_path_factory), 1)
    np.testing.assert_array_equal(actions, again)


def test_never_changes_the_robot_env(robot, tmp_path_factory):
    op = make_operator(robot, tmp_path_factory)
    robot.reset(5)
    op.start_episode()
    env = robot.env
    for _ in range(30):
        before = (tuple(env.agent.position), tuple(env.agent.velocity), tuple(env.block.position), env.block.angle)
        action = op.get_action()
        after = (tuple(env.agent.position), tuple(env.agent.velocity), tuple(env.block.position), env.block.angle)
        assert before == after
        robot.send_action(action)


def test_every_style_succeeds_and_styles_differ(robot, tmp_path_factory):
    assert "default" in STYLES and len(STYLES) >= 3
    paths = {}
    for style in STYLES:
        actions, agents, status = run(robot, make_operator(robot, tmp_path_factory, style), 3)
        assert status.success, f"{style}: coverage {status.coverage:.3f}"
        assert np.hypot(*np.diff(actions, axis=0).T).max() <= MAX_TARGET_STEP + 1e-3
        paths[style] = actions
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n = min(len(paths[a]), len(paths[b]))
            gap = np.hypot(*(paths[a][:n] - paths[b][:n]).T).mean()
            assert len(paths[a]) != len(paths[b]) or gap > 5.0, f"{a} and {b} move alike"
            assert gap > 2.0, f"{a} and {b} move alike ({gap:.1f} px apart on average)"
