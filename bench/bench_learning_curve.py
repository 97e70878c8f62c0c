"""Learning curve of a preset (default `pusht-state`) on the CPU, from sim-operator demonstrations.

Records expert demonstrations (recording seeds), trains with `fedbot.training.train`, and evaluates
every saved checkpoint on held-out seeds. Prints success rate and mean max coverage against
training steps and training wall time.

    .venv/bin/python bench/bench_learning_curve.py [--episodes 100] [--steps 12000] [--every 2000] [--eval 50]
        [--preset pusht-state] [--set kernel_size=3 ...]   # --set: DiffusionConfig fields to try, values in JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import expert_dataset, machine, preset_with  # noqa: E402
from fedbot.evaluation import evaluate  # noqa: E402
from fedbot.policy_io import load_policy  # noqa: E402
from fedbot.training import CHECKPOINTS_DIR, PRETRAINED_DIR, RUN_FILE, open_dataset, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--every", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=50)
    parser.add_argument("--preset", default="pusht-state")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="change preset fields for a trial")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-bench")
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = expert_dataset(args.work / f"curve-data-{args.episodes}", args.episodes)
    record_s = time.perf_counter() - start
    frames = open_dataset(dataset).meta.total_frames
    preset = preset_with(args.preset, args.set)
    out = args.work / "curve-run"
    shutil.rmtree(out, ignore_errors=True)

    # One run (one cosine schedule); a checkpoint's wall time is when its run file was written.
    start = time.time()
    train(dataset, preset, args.steps, out, save_every=args.every,
          keep_checkpoints=10_000, show_progress=False)
    walls = {
        int(path.name): (path / RUN_FILE).stat().st_mtime - start
        for path in sorted((out / CHECKPOINTS_DIR).iterdir()) if path.name.isdigit()
    }

    table = Table(title=f"{' '.join([args.preset, *args.set])} learning curve: {args.episodes} demonstrations "
                        f"({frames} frames), {args.eval} held-out seeds, {machine()}")
    for column in ("steps", "train wall time", "success rate", "mean max coverage"):
        table.add_column(column, justify="right")
    rows = []
    for target, wall in walls.items():
        policy = out / CHECKPOINTS_DIR / f"{target:06d}" / PRETRAINED_DIR
        report = evaluate(load_policy(policy), args.eval)
        rows.append({"steps": target, "wall_s": wall, "success_rate": report.success_rate,
                     "mean_max_coverage": report.mean_max_coverage})
        table.add_row(str(target), f"{wall / 60:.1f} min", f"{report.success_rate:.0%}",
                      f"{report.mean_max_coverage:.3f}")
    Console().print(table)
    Console().print(f"recording {args.episodes} demonstrations took {record_s / 60:.1f} min")
    (args.work / "curve.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
