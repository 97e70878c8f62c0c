"""Share of a federated round's wall time not spent in local training: localhost deployment, 2 robots.

Runs `fedbot-coordinator` (a real SuperLink) and two real `flower-supernode` processes on expert
datasets, then reads the coordinator's metrics: per round, the wall time of the training exchange
(send, ClientApp start, load, train, reply, aggregate) against the longest local training in it.

    .venv/bin/python bench/bench_round_overhead.py [--local-steps 100 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.supernode import BIN, SuperNodeSettings  # noqa: E402
from bench.common import expert_dataset, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(work: Path, datasets: list[Path], local_steps: int, rounds: int) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_config = (f"num-server-rounds={rounds} local-steps={local_steps} eval-every={rounds + 1} "
                  "eval-episodes=1 fraction-evaluate=0.0")
    coordinator = subprocess.Popen(
        [str(BIN / "fedbot-coordinator"), "run", "--state-dir", str(work / "coordinator"), "--port", str(port),
         "--output-dir", str(work / "outputs"), "--run-config", run_config],
        stdout=open(work / "coordinator.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    robots = []
    for i, dataset in enumerate(datasets):
        settings = SuperNodeSettings(superlink=f"127.0.0.1:{port}", dataset_root=dataset,
                                     model_inbox=work / f"robot{i}-inbox", output_dir=work / f"robot{i}-outputs",
                                     robot_id=f"robot{i}", port=free_port())
        robots.append(subprocess.Popen(settings.command(), stdout=open(work / f"robot{i}.log", "w"),
                                       stderr=subprocess.STDOUT, env={**env, **settings.environment(work / f"robot{i}")},
                                       start_new_session=True))
    try:
        if coordinator.wait(timeout=3600) != 0:
            raise RuntimeError(f"the coordinator failed; see {work / 'coordinator.log'}")
    finally:
        for process in [coordinator, *robots]:
            try:
                os.killpg(process.pid, 15)
            except ProcessLookupError:
                pass
    (run_dir,) = (work / "outputs").iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-steps", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per robot")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()
    datasets = [expert_dataset(args.work / f"overhead-robot{i}", args.episodes, style=style, seed_start=1000 * i)
                for i, style in enumerate(("default", "careful"))]
    table = Table(title=f"round overhead, localhost deployment, 2 robots, pusht-state batch 64, {machine()}")
    for column in ("local steps", "round", "training exchange s", "longest local training s", "not training"):
        table.add_column(column, justify="right")
    for steps in args.local_steps:
        rows = run_once(args.work / f"overhead-run-{steps}", datasets, steps, args.rounds)
        for row in rows:
            exchange, local = row["train-round-seconds"], row["local-train-seconds"]
            table.add_row(str(steps), str(row["round"]), f"{exchange:.1f}", f"{local:.1f}",
                          f"{1 - local / exchange:.0%}")
    Console().print(table)


if __name__ == "__main__":
    main()
