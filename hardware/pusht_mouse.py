"""A person operating the PushT sim with the mouse, behind lerobot's `Teleoperator` interface.

A pygame window shows the scene; the agent holds still until the pointer first comes near it
(as in gym-pusht's own teleop), then follows the pointer. Window pixels map 1:1 to sim units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pygame
from lerobot.teleoperators.config import TeleoperatorConfig
from lerobot.teleoperators.teleoperator import Teleoperator
from lerobot.utils.constants import ACTION

from hardware.pusht_sim import PushTSim

WINDOW = 512  # px; equal to the sim's workspace side, so a pixel is a sim unit
GRAB_RADIUS = 30.0


@TeleoperatorConfig.register_subclass("pusht_mouse")
@dataclass(kw_only=True)
class PushTMouseConfig(TeleoperatorConfig):
    """Settings of the mouse operator (none beyond lerobot's id)."""


class PushTMouse(Teleoperator):
    """Mouse pointer -> agent target, drawn over a live view of the sim."""

    config_class = PushTMouseConfig
    name = "pusht_mouse"
    realtime = True  # a person needs the loop paced at the robot's fps

    def __init__(self, config: PushTMouseConfig):
        super().__init__(config)
        self._robot: PushTSim | None = None
        self._screen: pygame.Surface | None = None
        self._following = False

    @property
    def action_features(self) -> dict:
        return {ACTION: (2,)}

    @property
    def feedback_features(self) -> dict:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._screen is not None

    @property
    def is_calibrated(self) -> bool:
        return True

    def attach(self, robot: PushTSim) -> None:
        self._robot = robot

    def connect(self, calibrate: bool = True) -> None:
        pygame.display.init()
        self._screen = pygame.display.set_mode((WINDOW, WINDOW))
        pygame.display.set_caption("fedbot: push the T onto the green target")

    def calibrate(self) -> None:
        """Nothing to calibrate."""

    def configure(self) -> None:
        """Nothing to configure."""

    def start_episode(self) -> None:
        self._following = False

    def get_action(self) -> dict[str, np.ndarray]:
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                raise KeyboardInterrupt("operator closed the window")
        frame = self._robot.render()
        surface = pygame.surfarray.make_surface(np.transpose(frame, (1, 0, 2)))
        self._screen.blit(pygame.transform.smoothscale(surface, (WINDOW, WINDOW)), (0, 0))
        pygame.display.flip()
        agent = np.asarray(self._robot.env.agent.position, dtype=np.float32)
        pointer = np.asarray(pygame.mouse.get_pos(), dtype=np.float32)
        self._following |= bool(np.linalg.norm(pointer - agent) < GRAB_RADIUS)
        return {ACTION: pointer if self._following else agent}

    def send_feedback(self, feedback: dict) -> None:
        """The mouse gives no feedback."""

    def disconnect(self) -> None:
        if self._screen is not None:
            pygame.display.quit()
            self._screen = None
