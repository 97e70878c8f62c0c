"""Policy evaluation in the PushT simulator: success rate and coverage over held-out seeds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import av.logging
import torch
from lerobot.utils.constants import ACTION
from lerobot.utils.io_utils import write_video
from rich.console import Console
from rich.table import Table

from fedbot.atomic_files import write_json_atomic
from fedbot.policy_io import LoadedPolicy
from fedbot.scenes import EVAL_SEED_START
from hardware.pusht_sim import PushTSim, PushTSimConfig


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_coverage: float
    steps: int


@dataclass
class EvalReport:
    policy: str
    seed_start: int
    success_rate: float
    mean_max_coverage: float
    episodes: list[EpisodeResult]

    def table(self) -> Table:
        table = Table(title=f"evaluation of {self.policy}")
        for column in ("episodes", "seeds", "success rate", "mean max coverage"):
            table.add_column(column, justify="right")
        last = self.seed_start + len(self.episodes) - 1
        table.add_row(
            str(len(self.episodes)),
            f"{self.seed_start}..{last}",
            f"{self.success_rate:.0%}",
            f"{self.mean_max_coverage:.3f}",
        )
        return table


def run_episode(robot: PushTSim, loaded: LoadedPolicy, seed: int, frames: list | None = None) -> EpisodeResult:
    """One policy episode from the scene drawn by `seed`; appends rendered frames if asked.

    The diffusion noise is seeded from `seed` too, so an episode is reproducible.
    """
    robot.reset(seed)
    loaded.reset()
    torch.manual_seed(seed)
    max_coverage, steps = robot.episode_status().coverage, 0
    while True:
        if frames is not None:
            frames.append(robot.render())
        action = loaded.select_action(robot.get_observation())
        robot.send_action({ACTION: action.numpy()})
        steps += 1
        status = robot.episode_status()
        max_coverage = max(max_coverage, status.coverage)
        if status.done:
            return EpisodeResult(seed, status.success, max_coverage, steps)


def evaluate(
    loaded: LoadedPolicy,
    episodes: int,
    out: Path | None = None,
    *,
    seed_start: int = EVAL_SEED_START,
    videos: int = 2,
    policy_name: str = "policy",
    scenes: tuple[int, int] = (0, 1),
) -> EvalReport:
    """Run `episodes` episodes on seeds seed_start.. (held out from recording), drawn from every scene
    or from part `scenes[0]` of `scenes[1]` (a robot's own part, hardware/pusht_sim.py).

    With `out`, writes `rollout_<seed>.mp4` for the first `videos` episodes and `eval.json`.
    """
    av.logging.set_level(av.logging.ERROR)  # libx264 otherwise prints its statistics per video
    if seed_start < EVAL_SEED_START:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_START} (lower seeds are for recording)")
    robot = PushTSim(PushTSimConfig(id="eval", scene_part=scenes[0], scene_parts=scenes[1]))
    missing = features_the_simulator_lacks(loaded)
    if missing:
        raise ValueError(
            f"the PushT simulator cannot run this policy: it needs {missing}, and the simulator has "
            f"{robot.observation_features | robot.action_features} (only policies trained on PushT "
            "data can be evaluated in it)"
        )
    robot.connect()
    results = []
    try:
        for i in range(episodes):
            seed = seed_start + i
            frames = [] if out is not None and i < videos else None
            results.append(run_episode(robot, loaded, seed, frames))
            if frames:
                Path(out).mkdir(parents=True, exist_ok=True)
                write_video(Path(out) / f"rollout_{seed}.mp4", frames, fps=robot.config.fps)
    finally:
        robot.disconnect()
    report = EvalReport(
        policy=policy_name,
        seed_start=seed_start,
        success_rate=sum(r.success for r in results) / max(len(results), 1),
        mean_max_coverage=sum(r.max_coverage for r in results) / max(len(results), 1),
        episodes=results,
    )
    if out is not None:
        write_json_atomic(Path(out) / "eval.json", asdict(report))
    return report


def features_the_simulator_lacks(loaded: LoadedPolicy) -> dict[str, tuple]:
    """The policy's inputs and action that the PushT simulator has not got (by key and size), e.g. an
    arm's joints and cameras; empty when the simulator can run the policy."""
    robot = PushTSim(PushTSimConfig(id="check"))  # not connected: only its feature shapes are read
    provided = robot.observation_features | robot.action_features
    config = loaded.policy.config
    wanted = {key: feature.shape for key, feature in (config.input_features | config.output_features).items()}
    return {
        key: shape
        for key, shape in wanted.items()
        if key not in provided or math.prod(shape) != math.prod(provided[key])
    }


def print_report(report: EvalReport) -> None:
    Console().print(report.table())
