"""The check every action chunk passes between the policy and the robot: finite and within the robot's bounds.

A model that passed its checks on arrival can still produce actions no robot should get: NaN from an
overflow, or targets far outside what the robot can reach (unnormalization statistics that do not fit
the robot). The robot's `action_bounds` say what it can take: gym-pusht's action space for the PushT
sim, the calibrated joint ranges for an SO arm (in lerobot's normalized units, which actions use).

A chunk with any value that is not finite, or that lies beyond a bound by more than RANGE_TOLERANCE
of its axis's range, is refused whole: none of its actions reaches the robot. Values just outside a
bound are clipped to it: a policy trained on teleop data reproduces the leader arm's range, which can
reach a little beyond the follower's calibrated range, and a trained PushT policy ends a push at the
border of the table.
"""

from __future__ import annotations

import numpy as np

RANGE_TOLERANCE = 0.1  # fraction of an axis's range an action may overshoot a bound by (then clipped)


class UnsafeActions(Exception):
    """A chunk of actions the robot must not get; the message says which value and why."""


def safe_actions(actions: np.ndarray, bounds: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """`actions` (one row per tick) clipped to `bounds` (lowest and highest value per axis; None: the
    robot has none). Raises UnsafeActions for a value that is not finite or is out of range."""
    if not np.isfinite(actions).all():
        bad = int((~np.isfinite(actions)).sum())
        raise UnsafeActions(f"{bad} of {actions.size} action values are not finite (NaN or inf)")
    if bounds is None:
        return actions
    low, high = (np.asarray(bound, dtype=np.float64) for bound in bounds)
    margin = RANGE_TOLERANCE * (high - low)
    outside = (actions < low - margin) | (actions > high + margin)
    if outside.any():
        step, axis = (int(i) for i in np.argwhere(outside)[0])
        raise UnsafeActions(
            f"{int(outside.sum())} of {actions.size} action values out of range: action {step} axis {axis} is "
            f"{actions[step, axis]:.6g}, the robot takes [{low[axis]:.6g}, {high[axis]:.6g}]"
        )
    return np.clip(actions, low, high).astype(actions.dtype)
