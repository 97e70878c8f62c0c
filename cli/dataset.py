"""`fedbot dataset`: a robot's episodes (length, date, task, which runs trained on them), and dropping
a bad episode from future training or giving it back (fedbot/dataset_curation.py says why a drop
list and not lerobot's delete_episodes).

An episode's date is when fedbot's recorder committed it (meta/fedbot_episodes.json). A dataset fedbot
did not record has none: then the modification time of the episode's data file stands in, marked
"file time" (fedbot's recorder starts a new data file per episode; lerobot's may share one file
between episodes, whose time is then that of the last of them).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedbot.dataset_curation import check_dataset, drop_episodes, dropped_episodes, undrop_episodes
from fedbot.dataset_usage import to_ranges, uses
from fedbot.episode_store import episode_notes


def dataset_root(args) -> Path:
    """The dataset `--root` names, or else the one of the agent `--config`."""
    if args.root is not None:
        return check_dataset(args.root)
    from agent.config import load_config

    return check_dataset(load_config(args.config).dataset_root)


def describe(root: Path) -> dict:
    """Every episode of the dataset at `root` and every training run that used some of them."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata(f"fedbot/{root.name}", root=root)
    notes, dropped, log = episode_notes(root), dropped_episodes(root), uses(root)
    runs = _runs(log)
    episodes = []
    for row in meta.episodes:
        index = row["episode_index"]
        note = notes.get(index, {})
        if "recorded" in note:
            recorded, source = note["recorded"], "commit"
        else:
            mtime = (root / meta.get_data_file_path(index)).stat().st_mtime
            recorded, source = datetime.fromtimestamp(mtime).isoformat(timespec="seconds"), "file time"
        episodes.append(
            {
                "index": index,
                "frames": row["length"],
                "seconds": round(row["length"] / meta.fps, 2),
                "recorded": recorded,
                "recorded-from": source,
                "seed": note.get("seed"),
                "task": ", ".join(row["tasks"]),
                "dropped": dropped.get(index),
                "runs": [run["run"] for run in runs if index in run["episodes"]],
            }
        )
    return {"root": str(root), "fps": meta.fps, "episodes": episodes, "runs": runs}


def _runs(log: list[dict]) -> list[dict]:
    """The training log grouped by run, in the order each run first used the dataset."""
    runs: dict[str, dict] = {}
    for entry in log:
        run = runs.setdefault(entry["run"], {"run": entry["run"], "rounds": [], "episodes": set()})
        if "round" in entry:
            run["rounds"].append(entry["round"])
        run["episodes"].update(entry["episodes"])
        run["last"] = entry["time"]
    return [{**run, "episodes": sorted(run["episodes"])} for run in runs.values()]


def print_description(description: dict, console: Console) -> None:
    episodes, runs = description["episodes"], description["runs"]
    dropped = sum(episode["dropped"] is not None for episode in episodes)
    table = Table(
        title=f"{description['root']}: {len(episodes)} episodes, {dropped} dropped from training, "
        f"{sum(e['frames'] for e in episodes)} frames at {description['fps']} fps"
    )
    for column in ("ep", "frames", "recorded", "seed"):
        table.add_column(column, no_wrap=True)
    table.add_column("task", overflow="ellipsis", no_wrap=True, max_width=14)
    table.add_column("training", min_width=14)
    table.add_column("runs", no_wrap=True)
    for e in episodes:
        recorded = e["recorded"].replace("T", " ")[:16] + ("*" if e["recorded-from"] == "file time" else "")
        training = (
            "used" if e["dropped"] is None else ": ".join(filter(None, ("[red]dropped[/]", e["dropped"]["reason"])))
        )
        seed = "" if e["seed"] is None else str(e["seed"])
        row = (str(e["index"]), str(e["frames"]), recorded, seed, e["task"], training)
        table.add_row(*row, str(len(e["runs"])))
    if any(e["recorded-from"] == "file time" for e in episodes):
        table.caption = "* not recorded by fedbot: the time of the episode's data file"
    console.print(table)
    if not runs:
        console.print("no training run has used this dataset yet")
        return
    used = Table(title="training runs that used it (the newest entries of .fedbot/training-log.jsonl)")
    for column in ("run", "rounds", "last used", "episodes"):
        used.add_column(column)
    for run in runs:
        last = datetime.fromtimestamp(run["last"]).isoformat(sep=" ", timespec="seconds")
        used.add_row(run["run"], to_ranges(run["rounds"]), last, to_ranges(run["episodes"]))
    console.print(used)


def cmd_dataset(args, console: Console) -> int:
    """`fedbot dataset show|drop|undrop`."""
    root = dataset_root(args)
    if args.action == "show":
        description = describe(root)
        if args.json:
            console.print_json(data=description)
        else:
            print_description(description, console)
        return 0
    if args.action == "drop":
        dropped = drop_episodes(root, args.episodes, args.reason)
    else:
        dropped = undrop_episodes(root, args.episodes)
    listed = to_ranges(list(dropped)) or "none"
    console.print(f"{root}: episodes dropped from future training: {listed}")
    return 0
