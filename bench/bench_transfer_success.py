"""Success after the same federated rounds with float32 and with float16 weight transfer.

The same localhost deployment (bench/common.py: `fedbot-coordinator` and two SuperNodes on expert
datasets of different styles) per run-config `seed`, once per `weights-dtype`; the global model of the
last round is evaluated by the coordinator on held-out seeds. The seed fixes the initial global
weights and each robot's batches and noise per round, so the runs of one seed differ only by the
transfer rounding (and what it changes downstream).

    .venv/bin/python bench/bench_transfer_success.py [--rounds 12] [--local-steps 500] [--episodes 50] [--eval 50]
                                                     [--seeds 0 1]
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
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=50, help="demonstrations per robot")
    parser.add_argument("--eval", type=int, default=50, help="held-out seeds for the final global model")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()
    datasets = [
        expert_dataset(
            args.work / f"transfer-robot{i}-{args.episodes}", args.episodes, style=style, seed_start=1000 * i
        )
        for i, style in enumerate(("default", "careful"))
    ]
    table = Table(
        title=f"final global model after {args.rounds} rounds x {args.local_steps} local steps, "
        f"2 robots x {args.episodes} demonstrations, {args.eval} held-out seeds, {machine()}"
    )
    for column in (
        "seed",
        "weights dtype",
        "bytes per robot per round",
        "train loss (last round)",
        "success rate",
        "mean max coverage",
    ):
        table.add_column(column, justify="right")
    for seed in args.seeds:
        for dtype in args.dtypes:
            run_config = (
                f"num-server-rounds={args.rounds} local-steps={args.local_steps} weights-dtype='{dtype}' "
                f"seed={seed} eval-every={args.rounds} eval-episodes={args.eval} fraction-evaluate=0.0 "
                f"save-every={args.rounds}"
            )
            last = run_federation(args.work / f"transfer-run-{dtype}-seed{seed}", datasets, run_config)[-1]
            table.add_row(
                str(seed),
                dtype,
                f"{last['bytes-received'] / last['robots'] / 1e6:.2f} MB",
                f"{last['train-loss']:.4f}",
                f"{last['server-success-rate']:.0%}",
                f"{last['server-mean-max-coverage']:.3f}",
            )
            Console().print(table)


if __name__ == "__main__":
    main()
