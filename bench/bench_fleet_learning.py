"""Is federating worth it? Local-only, federated and centralized training on exactly the same data.

A simulated fleet (default 4 robots x 25 expert demonstrations, robot i with operator style i and
scene part i: non-IID, as `fedbot sim --split-scenes` records them) is trained three ways with the
same recipe (the preset's) and the same compute:

- local: each robot alone on its own episodes, for its local steps summed over the rounds;
- federated: the project's ServerApp and ClientApp on Flower's simulation engine (`--engine
  deployment`: a localhost SuperLink and one SuperNode per robot), `--rounds` rounds
  of `--local-steps` per robot (`--strategies`: FedAvg and any of FedAvgM, FedProx, FedAdam, with
  `--server-lr`/`--server-momentum`; `--dp-noise`: with client-level differential privacy);
- centralized: the pooled episodes (lerobot's aggregate_datasets), as many gradient samples as the
  federation (robots x rounds x local steps, same batch size).

Every model at each budget of `--budgets` (in rounds) is evaluated on `--eval` held-out seeds
(>= 100000, the whole scene distribution); local models also on their own robot's scene part.
`bench/results/fleet_learning.jsonl` holds the points measured so far (BENCHMARKS.md); each names
the peak learning rate of its schedule (`lr`: `--lr`, or the preset's), and the table and plot show
the points of the run's. Runs with another `--lr` need a `--work` of their own (a run resumes from
its checkpoints whatever the learning rate). A deployment
point whose simulated twin is in the same `--work` records the largest difference between the two
engines' global weights.
Each finished point is appended to `--results` (default `<work>/results.jsonl`) and a run is
resumed from its last checkpoint, so the bench can be stopped and started again with the same
arguments; `--upto R` pauses every arm after R rounds (the schedules still span `--rounds`), so the
early budgets of all arms come first. Prints a table with 95% Wilson intervals and plots the
learning curves next to the results file (.png).

    .venv/bin/python bench/bench_fleet_learning.py [--robots 4] [--episodes 25] [--rounds 20]
        [--local-steps 500] [--budgets 5 10 20] [--eval 100] [--seeds 0 1] [--arms local federated centralized]
        [--strategies fedavg] [--server-lr LR --server-momentum M] [--dp-noise Z --dp-clip C]
        [--engine simulation] [--lr LR] [--upto ROUNDS] [--work DIR] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.common import fleet_datasets, localhost_deployment, machine, pooled_dataset, wilson  # noqa: E402
from fedbot.evaluation import evaluate  # noqa: E402
from fedbot.flower_processes import simulation_run, simulation_superlink  # noqa: E402
from fedbot.policy_io import load_policy  # noqa: E402
from fedbot.presets import get_preset  # noqa: E402
from fedbot.run_config import RunConfig  # noqa: E402
from fedbot.training import PRETRAINED_MODEL_DIR, last_checkpoint, train  # noqa: E402
from fedbot.typed_config import changed_keys  # noqa: E402

DEFAULT_LOCAL_STEPS = 500  # federated arms with other local steps per round are named for them


class Results:
    """results.jsonl: one line per evaluated point, keyed by (arm, seed, budget, robot, scenes, lr)."""

    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        self.rows = [json.loads(line) for line in lines if line.strip()]

    @staticmethod
    def key(row: dict) -> tuple:
        return row["arm"], row["seed"], row["budget_rounds"], row.get("robot"), row["scenes"], row["lr"]

    def has(self, **key) -> bool:
        return any(self.key(row) == self.key(key) for row in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def evaluate_point(results: Results, policy: Path, episodes: int, part: tuple[int, int], **key) -> None:
    if results.has(**key):
        return
    report = evaluate(load_policy(policy), episodes, scenes=part)
    successes = sum(e.success for e in report.episodes)
    results.add(
        {
            **key,
            "successes": successes,
            "episodes": episodes,
            "success_rate": report.success_rate,
            "mean_max_coverage": report.mean_max_coverage,
        }
    )


def recipe_lr(args) -> float:
    """The peak learning rate of every arm's schedule: `--lr`, or the preset's."""
    return args.lr or get_preset(args.preset).config["optimizer_lr"]


class Paused(Exception):
    """Raised from a checkpoint callback to stop training at `--upto`; the run resumes from there."""


def train_alone(
    args, results: Results, dataset: Path, out: Path, steps_per_round: int, arm: str, seed: int, robot: int | None
) -> None:
    """`fedbot train` on one dataset to the last budget; each budget's checkpoint is evaluated."""
    budgets = {rounds * steps_per_round: rounds for rounds in args.budgets}
    started = time.monotonic()

    pause_at = args.upto * steps_per_round

    def on_checkpoint(checkpoint: Path) -> None:
        step = int(checkpoint.name)
        rounds = budgets.get(step)
        if rounds is not None:
            wall = time.monotonic() - started  # this process's training time since it (re)started
            key = dict(
                arm=arm,
                seed=seed,
                budget_rounds=rounds,
                robot=robot,
                lr=recipe_lr(args),
                samples=step * get_preset(args.preset).batch_size,
                train_wall_s=wall,
            )
            policy = checkpoint / PRETRAINED_MODEL_DIR
            evaluate_point(results, policy, args.eval, (0, 1), scenes="all", **key)
            if robot is not None:
                evaluate_point(results, policy, args.eval, (robot, args.robots), scenes="own", **key)
        if step >= pause_at:
            raise Paused

    last = last_checkpoint(out)
    if last is not None and int(last.name) >= pause_at:
        return
    scenes = ("all", "own") if robot is not None else ("all",)
    due = [
        dict(arm=arm, seed=seed, budget_rounds=b, robot=robot, scenes=s, lr=recipe_lr(args))
        for b in args.budgets
        for s in scenes
    ]
    if all(results.has(**key) for key in due if key["budget_rounds"] <= args.upto):
        return  # measured in an earlier work directory
    try:
        train(
            dataset,
            get_preset(args.preset),
            max(args.budgets) * steps_per_round,
            out,
            save_every=steps_per_round,
            keep_checkpoints=len(args.budgets) + 1,
            seed=seed,
            lr=recipe_lr(args),
            show_progress=False,
            on_checkpoint=on_checkpoint,
        )
    except Paused:
        pass


def federate(args, results: Results, robots: list[Path], work: Path, strategy: str, seed: int) -> None:
    """The real ServerApp and ClientApp on Flower's simulation engine (or `--engine deployment`: a
    localhost SuperLink and one SuperNode per robot); the run's saved global models are evaluated at
    each budget. A stopped run is continued by the coordinator's resume."""
    arm = f"federated-{strategy}"
    if args.server_lr > 0 or args.server_momentum > 0:
        arm += f"-lr{args.server_lr:g}-momentum{args.server_momentum:g}"
    if args.dp_noise > 0:
        arm += f"-dp{args.dp_noise:g}-clip{args.dp_clip:g}"
    if args.local_steps != DEFAULT_LOCAL_STEPS:
        arm += f"-steps{args.local_steps}"
    if args.engine == "deployment":
        arm += "-deployment"
    if all(
        results.has(arm=arm, seed=seed, budget_rounds=b, robot=None, scenes="all", lr=recipe_lr(args))
        for b in args.budgets
    ):
        return
    run = replace(
        RunConfig(),
        num_server_rounds=max(args.rounds, *args.budgets),
        local_steps=args.local_steps,
        min_nodes=args.robots,
        lr=recipe_lr(args),
        fraction_evaluate=0.0,
        eval_episodes=0,
        strategy=strategy,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        dp_noise_multiplier=args.dp_noise,
        dp_clipping_norm=args.dp_clip,
        seed=seed,
        preset=args.preset,
        round_timeout=7200.0,
    )
    started = time.monotonic()
    log = work / f"{arm}-seed{seed}.log"
    if args.engine == "deployment":
        deployment = work / f"{arm}-seed{seed}"
        out = deployment / "outputs"
        if rounds_done(out) < min(args.upto, run.num_server_rounds):
            with localhost_deployment(deployment, robots, changed_keys(run)) as (coordinator, _):
                while coordinator.poll() is None and rounds_done(out) < args.upto:
                    time.sleep(10)
    else:
        out = work / f"{arm}-seed{seed}"
        run = replace(run, sim_data_dir=str(robots[0].parent), output_dir=str(out))
        if rounds_done(out) < min(args.upto, run.num_server_rounds):
            with simulation_superlink(work / "superlink") as env, open(log, "a") as log_file:
                flwr_run = subprocess.Popen(
                    simulation_run(changed_keys(run), args.robots, cpus_per_robot=2, stage=work / "app"),
                    env=env,
                    stdout=log_file,
                    stderr=log_file,
                )
                # leaving the block stops the SuperLink, and with it a run paused at --upto
                while flwr_run.poll() is None and rounds_done(out) < args.upto:
                    time.sleep(10)
                flwr_run.kill()
    run_dir = latest_run(out)
    if run_dir is None or rounds_done(out) < min(args.upto, run.num_server_rounds):
        raise RuntimeError(f"the federated run stopped early; see {log} or {work / f'{arm}-seed{seed}'}")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    twin = work / f"{arm.removesuffix('-deployment')}-seed{seed}"
    simulated = latest_run(twin) if args.engine == "deployment" else None
    for budget in (b for b in args.budgets if b <= rounds_done(out)):
        wall = sum(r["seconds"] for r in rounds if r["round"] <= budget)
        model = run_dir / "global_model" / f"round_{budget}"
        key = dict(
            arm=arm,
            seed=seed,
            budget_rounds=budget,
            robot=None,
            lr=recipe_lr(args),
            samples=budget * args.local_steps * args.robots * get_preset(args.preset).batch_size,
            train_wall_s=wall,
            this_process_wall_s=time.monotonic() - started,
        )
        if simulated is not None:
            key["max_weight_difference_from_simulation"] = weight_difference(
                simulated / "global_model" / f"round_{budget}", model
            )
        evaluate_point(results, model, args.eval, (0, 1), scenes="all", **key)


def weight_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the weights of two saved policies (the engine
    cross-check: the same run on Flower's simulation engine and on a localhost deployment)."""
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if first.keys() != second.keys():
        raise ValueError(f"{a} and {b} hold different tensors")
    return max((first[name].double() - second[name].double()).abs().max().item() for name in first)


def latest_run(out: Path) -> Path | None:
    runs = [d for d in out.iterdir() if (d / "state.json").is_file()] if out.is_dir() else []
    return max(runs, default=None)


def rounds_done(out: Path) -> int:
    """The last round of the latest run in `out` whose metrics line is written (its model is saved before)."""
    run_dir = latest_run(out)
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if metrics is None or not metrics.is_file():
        return 0
    rounds = []
    for line in metrics.read_text().splitlines():
        try:
            rounds.append(json.loads(line)["round"])
        except (ValueError, KeyError):
            pass  # a line being written
    return max(rounds, default=0)


def print_table(results: Results, args) -> None:
    table = Table(
        title=f"fleet learning: {args.robots} robots x {args.episodes} demonstrations, non-IID scenes, "
        f"{args.eval} held-out seeds per point, peak lr {recipe_lr(args):g}; {machine()}"
    )
    columns = ("arm", "steps per robot", "samples", "seeds", "success (95% CI)", "mean max coverage", "train wall")
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")
    groups: dict[tuple, list[dict]] = {}
    for row in recipe_rows(results, args):
        arm = row["arm"] if row["robot"] is None else f"local ({row['scenes']} scenes)"
        groups.setdefault((arm, steps_per_robot(row, args)), []).append(row)
    for (arm, steps), rows in sorted(groups.items()):
        successes, episodes = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
        low, high = wilson(successes, episodes)
        coverage = sum(r["mean_max_coverage"] for r in rows) / len(rows)
        table.add_row(
            arm,
            f"{steps:,}",
            f"{rows[0]['samples']:,}",
            str(len({r["seed"] for r in rows})),
            f"{successes / episodes:.0%} ({low:.0%}-{high:.0%})",
            f"{coverage:.3f}",
            f"{max(r['train_wall_s'] for r in rows) / 60:.0f} min",
        )
    Console(width=160).print(table)


def recipe_rows(results: Results, args) -> list[dict]:
    return [row for row in results.rows if row["lr"] == recipe_lr(args)]


def steps_per_robot(row: dict, args) -> int:
    """A point's compute per robot, in local steps: its budget in rounds x the local steps per round
    of the run behind it (robots share a federation's and a pooled run's samples)."""
    return row["samples"] // get_preset(args.preset).batch_size // (args.robots if row["robot"] is None else 1)


def plot(results: Results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (success_axis, coverage_axis) = plt.subplots(1, 2, figsize=(11, 4))
    shown = recipe_rows(results, args)
    for arm, scenes in sorted({(r["arm"], r["scenes"]) for r in shown}):
        rows = [r for r in shown if r["arm"] == arm and r["scenes"] == scenes]
        budgets = sorted({steps_per_robot(r, args) for r in rows})
        label = arm if arm != "local" else f"local, {scenes} scenes (mean of robots)"
        for axis, field in ((success_axis, "success_rate"), (coverage_axis, "mean_max_coverage")):
            means = [
                sum(r[field] for r in rows if steps_per_robot(r, args) == b)
                / len([r for r in rows if steps_per_robot(r, args) == b])
                for b in budgets
            ]
            axis.plot(budgets, means, marker="o", label=label)
    success_axis.set(xlabel="compute per robot (local steps)", ylabel="success rate", ylim=(0, 1))
    coverage_axis.set(xlabel="compute per robot (local steps)", ylabel="mean max coverage", ylim=(0, 1))
    success_axis.legend(fontsize=8)
    fig.suptitle(f"peak learning rate {recipe_lr(args):g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=25, help="demonstrations per robot")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=DEFAULT_LOCAL_STEPS)
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20], help="evaluated budgets, in rounds")
    parser.add_argument("--eval", type=int, default=100, help="held-out seeds per point")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--arms", nargs="+", default=["local", "federated", "centralized"])
    parser.add_argument("--strategies", nargs="+", default=["fedavg"])
    parser.add_argument("--server-lr", type=float, default=0.0, help="fedavgm, fedadam; 0: the strategy's default")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="fedavgm")
    parser.add_argument("--dp-noise", type=float, default=0.0, help="federated arms with differential privacy")
    parser.add_argument("--dp-clip", type=float, default=1.0, help="the L2 norm robots clip their updates to")
    parser.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        default="simulation",
        help="federated arms: Flower's simulation engine, or a localhost SuperLink and SuperNodes",
    )
    parser.add_argument("--preset", default="pusht-state")
    parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate of every arm; 0: the preset's")
    parser.add_argument("--upto", type=int, default=None, help="pause every arm after this many rounds")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-fleet-learning")
    parser.add_argument("--results", type=Path, default=None, help="the evaluated points (jsonl); <work>/results.jsonl")
    args = parser.parse_args()
    args.upto = args.upto or max(args.rounds, *args.budgets)
    args.work.mkdir(parents=True, exist_ok=True)
    results = Results(args.results or args.work / "results.jsonl")

    data = args.work / f"fleet-{args.robots}x{args.episodes}-split"
    robots = fleet_datasets(data, args.robots, args.episodes, split_scenes=True)
    pooled = pooled_dataset(args.work / "pooled", robots)
    for seed in args.seeds:
        if "federated" in args.arms:
            for strategy in args.strategies:
                federate(args, results, robots, args.work, strategy, seed)
        if "local" in args.arms:
            for i, dataset in enumerate(robots):
                train_alone(
                    args,
                    results,
                    dataset,
                    args.work / f"local-robot{i}-seed{seed}",
                    args.local_steps,
                    "local",
                    seed,
                    robot=i,
                )
        if "centralized" in args.arms:
            train_alone(
                args,
                results,
                pooled,
                args.work / f"centralized-seed{seed}",
                args.local_steps * args.robots,
                "centralized",
                seed,
                robot=None,
            )
    print_table(results, args)
    plot(results, args, results.path.with_suffix(".png"))


if __name__ == "__main__":
    main()
