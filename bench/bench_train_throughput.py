"""Training throughput of `fedbot train` versus `lerobot-train`, same dataset, preset and batch.

Both run as real commands. Each is run for a short and a long step count; the throughput is
(extra steps x batch) / (extra wall time), so start-up (imports, dataset loading) cancels out.

    .venv/bin/python bench/bench_train_throughput.py [--episodes 20] [--steps 50 250]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import expert_dataset, machine  # noqa: E402
from fedbot.presets import get_preset  # noqa: E402
from fedbot.training import train  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SVT_LOG": "1"},
    )
    return time.perf_counter() - start


def fedbot_cmd(dataset: Path, preset: str, steps: int, out: Path) -> list[str]:
    return [
        str(BIN / "fedbot"),
        "train",
        "--dataset",
        str(dataset),
        "--preset",
        preset,
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--save-every",
        str(steps),
    ]


def lerobot_cmd(dataset: Path, policy: Path, steps: int, batch: int, out: Path) -> list[str]:
    # The fedbot checkpoint carries the preset's full config (input features included), so
    # lerobot-train trains exactly the same model on the same inputs.
    return [
        str(BIN / "lerobot-train"),
        f"--dataset.repo_id=fedbot/{dataset.name}",
        f"--dataset.root={dataset}",
        f"--policy.path={policy}",
        "--policy.push_to_hub=false",
        f"--steps={steps}",
        f"--batch_size={batch}",
        f"--output_dir={out}",
        "--wandb.enable=false",
        f"--save_freq={steps}",
        f"--log_freq={steps}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs=2, default=[50, 250])
    parser.add_argument("--preset", default="pusht-state")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()
    dataset = expert_dataset(args.work / "throughput-data", args.episodes)
    preset = get_preset(args.preset)
    init = args.work / "init"
    shutil.rmtree(init, ignore_errors=True)
    policy = train(dataset, preset, 0, init, show_progress=False)

    rates = {}
    for name in ("fedbot train", "lerobot-train"):
        walls = []
        for steps in args.steps:
            out = args.work / f"out-{name.split()[0]}-{steps}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = (
                fedbot_cmd(dataset, args.preset, steps, out)
                if name == "fedbot train"
                else lerobot_cmd(dataset, policy, steps, preset.batch_size, out)
            )
            walls.append(timed(cmd))
        rates[name] = (args.steps[1] - args.steps[0]) * preset.batch_size / (walls[1] - walls[0])

    table = Table(title=f"training throughput, {args.preset}, batch {preset.batch_size}, {machine()}")
    table.add_column("trainer")
    table.add_column("samples/s", justify="right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:.0f}")
    table.add_row("ratio fedbot / lerobot", f"{rates['fedbot train'] / rates['lerobot-train']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
