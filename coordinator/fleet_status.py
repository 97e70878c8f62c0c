"""`fedbot-coordinator status`: the fleet as the coordinator's runs have seen it.

Read from the run directories in the output dir (coordinator/registry.py): each run's lineage holds
the census of the robots at its start (coordinator/lineage.py), its metrics.jsonl a row per robot
per round. Per robot: the newest run that counted it (its start is the robot's last contact that
the coordinator records), its episodes and frames then, the newest global model it held and the
one it ran, the rounds it trained in; and the fleet's latest published model.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.registry import RunDirectory


def fleet_status(output_dir: Path) -> dict:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} is not a coordinator's output directory")
    runs = sorted(d for d in output_dir.iterdir() if (d / "state.json").is_file())
    robots: dict[str, dict] = {}
    latest = None
    for run in runs:
        registry = RunDirectory.read_registry(run)
        finished = json.loads((run / "state.json").read_text())["finished"]
        if finished and registry["latest"] is not None:
            latest = {"run": run.name, "round": registry["latest"]}
        trained = rounds_per_node(run)
        for name, census in ((registry.get("lineage") or {}).get("robots") or {}).items():
            before = robots.get(name, {}).get("rounds-trained", 0)
            robots[name] = {
                "last-seen": run.name,
                "node": census["node"],
                "episodes": census["episodes"],
                "frames": census["frames"],
                "newest-model": census.get("newest_model"),
                "live-model": census.get("live_model"),
                "rounds-trained": before + trained.get(census["node"], 0),
            }
    return {"runs": len(runs), "latest-published": latest, "robots": robots}


def rounds_per_node(run: Path) -> dict[int, int]:
    """How many rounds of a run each node trained in, from its metrics rows."""
    counts: dict[int, int] = {}
    for row in RunDirectory.read_metrics(run):
        for robot in row.get("per-robot", []):
            if "malformed" not in robot:
                counts[robot["node"]] = counts.get(robot["node"], 0) + 1
    return counts


def print_status(status: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    latest = status["latest-published"]
    published = f"{latest['run']} round {latest['round']}" if latest else "none yet"
    table = Table(title=f"{status['runs']} runs; latest published model: {published}")
    for column in ("robot", "last seen (run)", "episodes", "frames", "runs model", "newest held", "rounds trained"):
        table.add_column(column)

    def version(value) -> str:
        return f"{value[0]} r{value[1]}" if value else "-"

    for name, robot in sorted(status["robots"].items()):
        table.add_row(
            name,
            robot["last-seen"],
            str(robot["episodes"]),
            str(robot["frames"]),
            version(robot["live-model"]),
            version(robot["newest-model"]),
            str(robot["rounds-trained"]),
        )
    Console().print(table)
