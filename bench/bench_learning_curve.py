"""Learning curve of one training recipe on the CPU: pooled sim-operator demonstrations of a fleet.

Records each simulated robot's expert demonstrations (as `fedbot sim` does: robot i has operator
style i, seeds from i * 1000 and, with --split-scenes, scene part i), pools them with lerobot's
aggregate_datasets, trains with `fedbot.training.train` and evaluates every checkpoint on held-out
seeds as soon as it is written. Each evaluated point is appended to `<work>/curves/<name>.jsonl`;
run again with the same arguments, the run resumes from its last checkpoint and skips the points
it has. Prints success rate (95% Wilson interval) and mean max coverage against training steps.

    .venv/bin/python bench/bench_learning_curve.py --name ema [--robots 4] [--episodes 25] [--split-scenes]
        [--steps 30000] [--every 2500] [--eval 50] [--seed 0] [--set ema_power=0.75 optimizer_lr=3e-4 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import fleet_datasets, machine, pooled_dataset, preset_with, wilson  # noqa: E402
from fedbot.evaluation import evaluate  # noqa: E402
from fedbot.policy_io import load_policy  # noqa: E402
from fedbot.training import PRETRAINED_MODEL_DIR, open_dataset, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="names the results file and the run directory")
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=25, help="demonstrations per robot")
    parser.add_argument("--split-scenes", action="store_true", help="robot i records scene part i of --robots")
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--every", type=int, default=2500)
    parser.add_argument("--eval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--preset", default="pusht-state")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="change preset fields for a trial")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = args.work / f"fleet-{args.robots}x{args.episodes}{'-split' if args.split_scenes else ''}"
    dataset = pooled_dataset(data / "pooled", fleet_datasets(data, args.robots, args.episodes, args.split_scenes))
    frames = open_dataset(dataset).meta.total_frames
    preset = preset_with(args.preset, args.set)
    results = args.work / "curves" / f"{args.name}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {row["steps"] for row in map(json.loads, results.read_text().splitlines())} if results.exists() else set()
    started = time.monotonic()

    def evaluate_checkpoint(checkpoint: Path) -> None:
        steps = int(checkpoint.name)
        if steps in done:
            return
        report = evaluate(load_policy(checkpoint / PRETRAINED_MODEL_DIR), args.eval)
        row = {
            "steps": steps,
            "samples": steps * preset.batch_size,
            "success_rate": report.success_rate,
            "successes": sum(e.success for e in report.episodes),
            "episodes": args.eval,
            "mean_max_coverage": report.mean_max_coverage,
            "wall_s_this_process": time.monotonic() - started,
            "settings": args.set,
            "seed": args.seed,
            "data": data.name,
            "threads": args.threads,
        }
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    train(
        dataset,
        preset,
        args.steps,
        args.work / "curve-runs" / args.name,
        save_every=args.every,
        keep_checkpoints=2,
        seed=args.seed,
        show_progress=False,
        on_checkpoint=evaluate_checkpoint,
    )

    rows = sorted(map(json.loads, results.read_text().splitlines()), key=lambda r: r["steps"])
    table = Table(
        title=f"{args.name} ({' '.join([args.preset, *args.set])}): {data.name} ({frames} frames), "
        f"{args.eval} held-out seeds, {machine()}"
    )
    for column in ("steps", "samples", "success rate (95% CI)", "mean max coverage"):
        table.add_column(column, justify="right")
    for row in rows:
        low, high = wilson(row["successes"], row["episodes"])
        table.add_row(
            str(row["steps"]),
            f"{row['samples']:,}",
            f"{row['success_rate']:.0%} ({low:.0%}-{high:.0%})",
            f"{row['mean_max_coverage']:.3f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
