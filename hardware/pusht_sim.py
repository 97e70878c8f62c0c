"""The PushT simulator robot behind lerobot's `Robot` interface.

The robot owns one gym-pusht environment. Its observation and action features are named with the
dataset feature keys fedbot records (`observation.image`, `observation.state`,
`observation.environment_state`, `action`), so recording and control code treat it like any robot.
Episode placement (`reset`) and the episode outcome (`episode_status`) are what a person does and
sees on a real bench; the sim answers them itself.

A robot can be given one part of the scene distribution (`scene_part` of `scene_parts`): its T then
always starts with an orientation in that sector of the circle, as if each lab of a fleet only met
some of the situations. Each seed still draws gym-pusht's scene (agent and T positions, T angle);
the angle is then mapped into the sector, so a part is the whole distribution conditioned on the
T's starting angle.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from lerobot.robots.config import RobotConfig
from lerobot.robots.robot import Robot
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE


@RobotConfig.register_subclass("pusht_sim")
@dataclass(kw_only=True)
class PushTSimConfig(RobotConfig):
    """Settings of the simulated PushT robot."""

    fps: int = 10
    image_size: int = 96
    render_size: int = 256  # side of the frames rendered for videos and the mouse operator's window
    max_episode_steps: int = 300
    reset_seconds: float = 0.0  # between recorded episodes: none, the simulator sets up each scene itself
    scene_part: int = 0  # this robot's part of the scenes: the T's starting angle in sector scene_part ...
    scene_parts: int = 1  # ... of scene_parts equal sectors of [-pi, pi); 1: the whole distribution

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.scene_part < self.scene_parts:
            raise ValueError(f"scene-part must lie in [0, scene-parts={self.scene_parts}), got {self.scene_part}")


def scene_state(seed: int, part: int = 0, parts: int = 1) -> np.ndarray:
    """The initial state gym-pusht draws for `seed` (agent x, y, T x, y, T angle), with the T's angle
    mapped into sector `part` of `parts`. The draws repeat PushTEnv.reset's, in its order, from the
    generator gymnasium seeds it with (tests/test_pusht_sim.py checks they give the same scene)."""
    rng, _ = seeding.np_random(seed)
    state = np.array(
        [
            rng.integers(50, 450),
            rng.integers(50, 450),
            rng.integers(100, 400),
            rng.integers(100, 400),
            rng.uniform(-np.pi, np.pi),
        ]
    )
    width = 2 * np.pi / parts
    state[4] = -np.pi + width * (part + ((state[4] + np.pi) % (2 * np.pi)) / (2 * np.pi))
    return state


@dataclass(frozen=True)
class EpisodeStatus:
    """What the bench shows after a step: is the task done, did it succeed, how far along it is."""

    done: bool
    success: bool | None  # None: nobody judged it (on a real bench the arm only counts time)
    coverage: float


class PushTSim(Robot):
    """A disc pushed by position targets in [0, 512]^2 that has to push a T onto its goal pose."""

    config_class = PushTSimConfig
    name = "pusht_sim"

    def __init__(self, config: PushTSimConfig):
        super().__init__(config)
        self.config = config
        self._env: gym.Env | None = None
        self._coverage = 0.0
        self._steps = 0

    @cached_property
    def observation_features(self) -> dict:
        size = self.config.image_size
        return {OBS_IMAGE: (size, size, 3), OBS_STATE: (2,), OBS_ENV_STATE: (16,)}

    @cached_property
    def action_features(self) -> dict:
        return {ACTION: (2,)}

    @property
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The lowest and highest action target per axis, gym-pusht's action space (None while not
        connected). The sim itself does not clip: its agent is kinematic and passes through walls."""
        if self._env is None:
            return None
        return self._env.action_space.low, self._env.action_space.high

    @property
    def is_connected(self) -> bool:
        return self._env is not None

    @property
    def is_calibrated(self) -> bool:
        return True

    def connect(self, calibrate: bool = True) -> None:
        if self._env is None:
            self._env = gym.make(
                "gym_pusht/PushT-v0",
                obs_type="environment_state_agent_pos",  # cheap steps; images rendered on demand
                render_mode="rgb_array",
                observation_width=self.config.image_size,
                observation_height=self.config.image_size,
                visualization_width=self.config.render_size,
                visualization_height=self.config.render_size,
            )
            self.reset(seed=0)

    def calibrate(self) -> None:
        """The simulator needs no calibration."""

    def configure(self) -> None:
        """The simulator needs no configuration."""

    @property
    def env(self):
        """The unwrapped gym-pusht environment (bodies, goal pose), for sim-only tools."""
        self._require_connected()
        return self._env.unwrapped

    def reset(self, seed: int) -> None:
        """Place the agent and the T for a new episode, as drawn by gym-pusht from `seed` (in this
        robot's part of the scenes)."""
        self._require_connected()
        if self.config.scene_parts == 1:
            self._env.reset(seed=seed)
        else:
            state = scene_state(seed, self.config.scene_part, self.config.scene_parts)
            self._env.reset(seed=seed, options={"reset_to_state": state})
        self._coverage = self.env._get_coverage()
        self._steps = 0

    def get_observation(self) -> dict[str, np.ndarray]:
        self._require_connected()
        env = self.env
        image = env._render()  # rgb at observation size, exactly what gym-pusht observes
        return {
            OBS_IMAGE: image,
            OBS_STATE: np.asarray(env.agent.position, dtype=np.float32),
            OBS_ENV_STATE: env.get_keypoints(env._block_shapes).flatten().astype(np.float32),
        }

    def send_action(self, action: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_connected()
        target = np.asarray(action[ACTION], dtype=np.float32).reshape(2)
        _, _, _, _, info = self._env.step(target)
        self._coverage = float(info["coverage"])
        self._steps += 1
        return {ACTION: target}

    def render(self) -> np.ndarray:
        """An RGB view of the scene at `render_size`, with the last action drawn, for videos."""
        self._require_connected()
        return self._env.render()

    def episode_status(self) -> EpisodeStatus:
        success = self._coverage > self.env.success_threshold
        done = success or self._steps >= self.config.max_episode_steps
        return EpisodeStatus(done=done, success=success, coverage=self._coverage)

    def disconnect(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def _require_connected(self) -> None:
        if self._env is None:
            raise ConnectionError(f"{self} is not connected")
