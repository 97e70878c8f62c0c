"""Share of a federated round's wall time not spent in local training: localhost deployment, 2 robots.

Runs `fedbot-coordinator` (a real SuperLink) and two real `flower-supernode` processes on expert
datasets, then reads the coordinator's metrics: per round, the wall time of the training exchange against
the longest local training in it, and where the rest went (slowest robot per phase): inbound (the
message's way to the running ClientApp), setup (dataset, policy, optimizer), train, pack (the reply's
records) and return (the reply's way back to the ServerApp).

    .venv/bin/python bench/bench_round_overhead.py [--local-steps 100 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import expert_dataset, machine, run_federation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-steps", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per robot")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()
    datasets = [
        expert_dataset(args.work / f"overhead-robot{i}", args.episodes, style=style, seed_start=1000 * i)
        for i, style in enumerate(("default", "careful"))
    ]
    table = Table(title=f"round overhead, localhost deployment, 2 robots, pusht-state batch 64, {machine()}")
    phases = ("inbound", "setup", "train", "pack", "return")
    for column in ("local steps", "round", "training exchange s", *(f"{p} s" for p in phases), "not training"):
        table.add_column(column, justify="right")
    for steps in args.local_steps:
        run_config = (
            f"num-server-rounds={args.rounds} local-steps={steps} eval-every={args.rounds + 1} "
            "eval-episodes=1 fraction-evaluate=0.0"
        )
        rows = run_federation(args.work / f"overhead-run-{steps}", datasets, run_config)
        for row in rows:
            exchange = row["train-round-seconds"]
            table.add_row(
                str(steps),
                str(row["round"]),
                f"{exchange:.1f}",
                *(f"{row[f'{p}-seconds']:.1f}" for p in phases),
                f"{1 - row['train-seconds'] / exchange:.0%}",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
