"""Which recorded episodes training uses: the operator's drop list, kept beside the dataset.

A bad episode (the T knocked off the table, a person's hand in the picture) is dropped from future
training by listing it in `DIR/.fedbot/dropped.json`, replaced atomically under a lock. Training
(`fedbot/training.py`: `fedbot train` and the ClientApp) passes the kept episodes to lerobot's
`LeRobotDataset(episodes=...)` and normalizes with the statistics of the kept episodes only (lerobot's
per-episode statistics, aggregated by its own `aggregate_stats`): a dropped episode's outliers would
otherwise still stretch the min-max range every state and action is scaled by.

Why a list and not lerobot's `dataset_tools.delete_episodes`: that writes a new dataset with the
remaining episodes renumbered and their videos re-encoded. On a robot it would cost minutes of CPU per
drop, could not run while the agent records into the dataset, could not be undone, and would renumber
the episodes that the training log (`fedbot/dataset_usage.py`) and the operator's own notes refer to.
The list leaves the recorded history as it is and `fedbot dataset undrop` restores an episode. Plain
`lerobot-train` on the directory does not read the list: it trains on every episode.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from lerobot.datasets.compute_stats import aggregate_stats
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.io_utils import load_info, load_nested_dataset
from lerobot.datasets.utils import EPISODES_DIR

from fedbot.atomic_files import write_json_atomic

CURATION_DIR = ".fedbot"  # in the dataset's root, beside meta/, data/, videos/
DROPPED_FILE = "dropped.json"
LOCK_FILE = "lock"
MAX_REASON = 200  # characters of the reason noted with a drop


def check_dataset(root: Path) -> Path:
    """`root` if it holds a LeRobot dataset, else FileNotFoundError naming what is missing."""
    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise FileNotFoundError(f"{root} holds no LeRobot dataset (no committed episode in meta/info.json)")
    return root


@contextmanager
def locked(root: Path) -> Iterator[Path]:
    """Hold the dataset's curation lock (drop list and training log); yields their directory."""
    directory = Path(root) / CURATION_DIR
    directory.mkdir(exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def dropped_episodes(root: Path) -> dict[int, dict]:
    """Dropped episode index -> {"dropped": ISO time, "reason": text}; empty when none is."""
    path = Path(root) / CURATION_DIR / DROPPED_FILE
    if not path.is_file():
        return {}
    try:
        return {int(index): entry for index, entry in json.loads(path.read_text())["dropped"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {error}); fix or remove it") from None


def drop_episodes(root: Path, episodes: list[int], reason: str = "") -> dict[int, dict]:
    """Drop `episodes` from future training; returns the drop list. An index the dataset does not
    hold is refused, naming the range it does hold."""
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason is {len(reason)} characters long; at most {MAX_REASON}")
    root = check_dataset(root)
    _check_indices(root, episodes)
    with locked(root) as directory:
        dropped = dropped_episodes(root)
        when = datetime.now().isoformat(timespec="seconds")
        dropped.update({index: {"dropped": when, "reason": reason} for index in episodes if index not in dropped})
        _write(directory, dropped)
    return dropped


def undrop_episodes(root: Path, episodes: list[int]) -> dict[int, dict]:
    """Give dropped `episodes` back to training; returns the drop list. An episode that is not
    dropped is refused."""
    root = check_dataset(root)
    with locked(root) as directory:
        dropped = dropped_episodes(root)
        missing = sorted(set(episodes) - set(dropped))
        if missing:
            listed = ", ".join(map(str, sorted(dropped))) or "none"
            raise ValueError(f"episode {_names(missing)} of {root} is not dropped (dropped: {listed})")
        kept = {index: entry for index, entry in dropped.items() if index not in episodes}
        _write(directory, kept)
    return kept


def kept_episodes(root: Path, total: int) -> list[int]:
    """The episodes of the first `total` that training uses: all but the dropped ones (at least one)."""
    dropped = dropped_episodes(root)
    kept = [index for index in range(total) if index not in dropped]
    if not kept:
        raise ValueError(f"every episode of {root} is dropped: nothing to train on (`fedbot dataset undrop`)")
    return kept


def keep_episodes(meta: LeRobotDatasetMetadata, kept: list[int]) -> None:
    """Make `meta.stats` (in memory; nothing is written) the statistics of the `kept` episodes."""
    if len(kept) == meta.total_episodes:
        return
    table = load_nested_dataset(meta.root / EPISODES_DIR).data.table
    wanted = set(kept)
    per_episode = []
    for row in table.to_pylist():
        if row["episode_index"] in wanted:
            stats: dict[str, dict] = {}
            for column, value in row.items():
                if column.startswith("stats/"):
                    feature, name = column.removeprefix("stats/").rsplit("/", 1)
                    stats.setdefault(feature, {})[name] = np.asarray(value)
            per_episode.append(stats)
    aggregated = aggregate_stats(per_episode)
    meta.stats = {feature: aggregated[feature] for feature in meta.stats}


def _check_indices(root: Path, episodes: list[int]) -> None:
    total = load_info(root).total_episodes
    unknown = sorted({index for index in episodes if not 0 <= index < total})
    if unknown:
        holds = f"episodes 0 to {total - 1}" if total else "no episode"
        raise ValueError(f"{root} has no episode {_names(unknown)} (it holds {holds})")


def _names(indices: list[int]) -> str:
    return ", ".join(map(str, indices))


def _write(directory: Path, dropped: dict[int, dict]) -> None:
    write_json_atomic(directory / DROPPED_FILE, {"dropped": {str(i): dropped[i] for i in sorted(dropped)}})
