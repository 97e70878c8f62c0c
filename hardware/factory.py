"""Robots and teleoperators by name, as agent configs and the CLI name them."""

from __future__ import annotations


def make_robot(kind: str, robot_id: str, **settings):
    """A (not yet connected) robot of type `kind`; `settings` are its config's fields (PushTSimConfig,
    SOArmConfig)."""
    if kind == "pusht_sim":
        from hardware.pusht_sim import PushTSim, PushTSimConfig

        return PushTSim(PushTSimConfig(id=robot_id, **settings))
    from hardware.so_arm import FOLLOWER_TYPES, SOArm, SOArmConfig

    if kind in FOLLOWER_TYPES:
        return SOArm(SOArmConfig(id=robot_id, arm_type=kind, **settings))
    raise ValueError(f"unknown robot type {kind!r}")


def make_teleop(kind: str, seed: int = 0, style: str = "default", **settings):
    """A (not yet connected) teleoperator: the scripted sim expert, a person with the mouse, or a
    person moving a leader arm (`settings`: SOLeaderArmConfig fields)."""
    if kind in ("mouse", "pusht_mouse"):
        from hardware.pusht_mouse import PushTMouse, PushTMouseConfig

        return PushTMouse(PushTMouseConfig(id="mouse"))
    if kind in ("expert", "pusht_expert"):
        from hardware.pusht_expert import PushTExpert, PushTExpertConfig

        return PushTExpert(PushTExpertConfig(id=f"expert-{style}", style=style, seed=seed))
    from hardware.so_arm import LEADER_TYPES, SOLeaderArm, SOLeaderArmConfig

    if kind in LEADER_TYPES:
        return SOLeaderArm(SOLeaderArmConfig(arm_type=kind, **settings))
    raise ValueError(f"unknown teleoperator type {kind!r}")
