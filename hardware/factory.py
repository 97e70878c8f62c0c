"""Robots and teleoperators by name, as agent configs and the CLI name them."""

from __future__ import annotations


def make_robot(kind: str, robot_id: str):
    """A (not yet connected) robot of type `kind`."""
    if kind == "pusht_sim":
        from hardware.pusht_sim import PushTSim, PushTSimConfig

        return PushTSim(PushTSimConfig(id=robot_id))
    raise ValueError(f"unknown robot type {kind!r}")


def make_teleop(kind: str, style: str = "default", seed: int = 0):
    """A (not yet connected) teleoperator: the scripted sim expert or a person with the mouse."""
    if kind in ("mouse", "pusht_mouse"):
        from hardware.pusht_mouse import PushTMouse, PushTMouseConfig

        return PushTMouse(PushTMouseConfig(id="mouse"))
    if kind in ("expert", "pusht_expert"):
        from hardware.pusht_expert import PushTExpert, PushTExpertConfig

        return PushTExpert(PushTExpertConfig(id=f"expert-{style}", style=style, seed=seed))
    raise ValueError(f"unknown teleoperator type {kind!r}")
