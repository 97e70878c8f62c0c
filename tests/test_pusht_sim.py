"""The PushT simulator robot behind lerobot's Robot interface, and the mouse operator."""

import numpy as np
import pygame
import pytest
from lerobot.robots.robot import Robot
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE

from hardware.pusht_mouse import PushTMouse, PushTMouseConfig
from hardware.pusht_sim import PushTSim, PushTSimConfig, scene_state


@pytest.fixture
def robot():
    robot = PushTSim(PushTSimConfig(id="t", max_episode_steps=5))
    robot.connect()
    yield robot
    robot.disconnect()


def test_features_and_observation(robot):
    assert isinstance(robot, Robot)
    assert robot.observation_features == {OBS_IMAGE: (96, 96, 3), OBS_STATE: (2,), OBS_ENV_STATE: (16,)}
    assert robot.action_features == {ACTION: (2,)}
    obs = robot.get_observation()
    assert {k: v.shape for k, v in obs.items()} == robot.observation_features
    assert obs[OBS_IMAGE].dtype == np.uint8 and obs[OBS_STATE].dtype == np.float32
    np.testing.assert_allclose(obs[OBS_STATE], robot.env.agent.position, rtol=1e-6)


def test_reset_is_deterministic_per_seed(robot):
    robot.reset(7)
    first = robot.get_observation()
    robot.reset(8)
    other = robot.get_observation()
    robot.reset(7)
    again = robot.get_observation()
    np.testing.assert_array_equal(first[OBS_ENV_STATE], again[OBS_ENV_STATE])
    assert not np.array_equal(first[OBS_ENV_STATE], other[OBS_ENV_STATE])


def test_actions_move_the_agent_and_episodes_end(robot):
    robot.reset(0)
    start = robot.get_observation()[OBS_STATE]
    target = np.clip(start + np.array([40.0, 0.0]), 0, 512).astype(np.float32)
    for _ in range(5):
        assert not robot.episode_status().done
        sent = robot.send_action({ACTION: target})
        np.testing.assert_array_equal(sent[ACTION], target)
    assert np.linalg.norm(robot.get_observation()[OBS_STATE] - target) < np.linalg.norm(start - target)
    status = robot.episode_status()
    assert status.done and not status.success and 0.0 <= status.coverage <= 1.0
    assert robot.render().shape == (256, 256, 3)


def test_disconnected_robot_refuses_io():
    robot = PushTSim(PushTSimConfig(id="t"))
    with pytest.raises(ConnectionError):
        robot.get_observation()


def test_mouse_operator_holds_until_grabbed_then_follows(robot, monkeypatch):
    mouse = PushTMouse(PushTMouseConfig(id="m"))
    mouse.connect()  # SDL's dummy video driver (conftest): a real pygame window without a screen
    mouse.attach(robot)
    try:
        robot.reset(0)
        mouse.start_episode()
        agent = np.asarray(robot.env.agent.position, dtype=np.float32)
        far = (int(agent[0] + 200) % 512, int(agent[1] + 200) % 512)
        monkeypatch.setattr(pygame.mouse, "get_pos", lambda: far)  # the pointer is the hardware boundary
        np.testing.assert_allclose(mouse.get_action()[ACTION], agent)
        near = (int(agent[0]) + 5, int(agent[1]))
        monkeypatch.setattr(pygame.mouse, "get_pos", lambda: near)
        np.testing.assert_allclose(mouse.get_action()[ACTION], near)
        monkeypatch.setattr(pygame.mouse, "get_pos", lambda: far)  # once grabbed, it follows
        np.testing.assert_allclose(mouse.get_action()[ACTION], far)
    finally:
        mouse.disconnect()


def test_scene_state_repeats_gym_pushts_own_draw(robot):
    """The whole distribution (one part) through `scene_state` is exactly gym-pusht's scene per seed."""
    for seed in (0, 5, 100_007):
        robot.reset(seed)
        drawn = robot.get_observation()
        robot.env.reset(seed=seed, options={"reset_to_state": scene_state(seed)})
        replayed = robot.get_observation()
        for key in drawn:
            np.testing.assert_array_equal(drawn[key], replayed[key])


def test_a_scene_part_keeps_the_ts_start_angle_in_its_sector_and_the_rest_of_the_scene():
    whole = PushTSim(PushTSimConfig(id="whole"))
    part = PushTSim(PushTSimConfig(id="part", scene_part=1, scene_parts=4))  # angles in [-pi/2, 0)
    whole.connect()
    part.connect()
    angles = []
    for seed in range(100_000, 100_040):
        whole.reset(seed)
        part.reset(seed)
        angle = (part.env.block.angle + np.pi) % (2 * np.pi) - np.pi
        assert -np.pi / 2 <= angle < 0.0
        angles.append(angle)
        np.testing.assert_array_equal(whole.env.agent.position, part.env.agent.position)
    assert np.ptp(angles) > np.pi / 4  # spread over the sector, not one scene
    whole.disconnect()
    part.disconnect()
    with pytest.raises(ValueError, match="scene-part"):
        PushTSimConfig(id="bad", scene_part=4, scene_parts=4)
