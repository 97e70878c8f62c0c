"""Benchmark the scripted PushT operator: every style on held-out seeds, in the PushT simulator.

    .venv/bin/python bench/bench_operator.py [--episodes 50] [--seed-start 100000] [--styles default swift]
        [--scene-parts 4]

Prints, per style (and, with --scene-parts N, per part of the scenes, hardware/pusht_sim.py):
success rate, mean max coverage, mean episode length, mean CPU seconds per episode
(`time.process_time`; all of it, and the operator's share), and the largest target step and
target-agent distance seen.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardware.pusht_expert import (  # noqa: E402
    MAX_REACH,
    MAX_TARGET_STEP,
    STYLES,
    PushTExpert,
    PushTExpertConfig,
)
from hardware.pusht_sim import PushTSim, PushTSimConfig  # noqa: E402


@dataclass
class Episode:
    success: bool
    max_coverage: float
    steps: int
    cpu_s: float
    op_cpu_s: float
    max_step: float
    max_reach: float


def run_episode(robot: PushTSim, op: PushTExpert, seed: int) -> Episode:
    start = time.process_time()
    robot.reset(seed)
    t = time.process_time()
    op.start_episode()
    op_cpu = time.process_time() - t
    prev: np.ndarray | None = None
    max_cov = max_step = max_reach = 0.0
    steps = 0
    while True:
        agent = np.asarray(robot.env.agent.position)
        t = time.process_time()
        action = op.get_action()["action"]
        op_cpu += time.process_time() - t
        max_reach = max(max_reach, float(np.hypot(*(action - agent))))
        if prev is not None:
            max_step = max(max_step, float(np.hypot(*(action - prev))))
        prev = action
        robot.send_action({"action": action})
        steps += 1
        status = robot.episode_status()
        max_cov = max(max_cov, status.coverage)
        if status.done:
            break
    return Episode(status.success, max_cov, steps, time.process_time() - start, op_cpu, max_step, max_reach)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-start", type=int, default=100000)
    parser.add_argument("--styles", nargs="*", default=list(STYLES))
    parser.add_argument("--operator-seed", type=int, default=0)
    parser.add_argument("--scene-parts", type=int, default=1, help="also split the scenes into N parts")
    args = parser.parse_args()

    table = Table(title=f"PushT expert, seeds {args.seed_start}..{args.seed_start + args.episodes - 1}")
    cols = (
        "style",
        "scenes",
        "success",
        "mean max cov",
        "mean steps",
        "CPU s/ep",
        "operator CPU s/ep",
        "max step px",
        "max reach px",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "style" else "right")
    parts = [(0, 1)] + [(part, args.scene_parts) for part in range(args.scene_parts) if args.scene_parts > 1]
    for style in args.styles:
        for part in parts:
            robot = PushTSim(PushTSimConfig(scene_part=part[0], scene_parts=part[1]))
            robot.connect()
            op = PushTExpert(PushTExpertConfig(style=style, seed=args.operator_seed))
            op.connect()
            op.attach(robot)
            eps = [run_episode(robot, op, args.seed_start + i) for i in range(args.episodes)]
            op.disconnect()
            robot.disconnect()
            failed = [args.seed_start + i for i, e in enumerate(eps) if not e.success]
            table.add_row(
                style,
                "all" if part[1] == 1 else f"part {part[0]} of {part[1]}",
                f"{np.mean([e.success for e in eps]):.0%}",
                f"{np.mean([e.max_coverage for e in eps]):.3f}",
                f"{np.mean([e.steps for e in eps]):.1f}",
                f"{np.mean([e.cpu_s for e in eps]):.2f}",
                f"{np.mean([e.op_cpu_s for e in eps]):.2f}",
                f"{max(e.max_step for e in eps):.1f} (<= {MAX_TARGET_STEP:g})",
                f"{max(e.max_reach for e in eps):.1f} (<= {MAX_REACH:g})",
            )
            if failed:
                print(f"{style} {part}: failed seeds {failed}", file=sys.stderr)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
