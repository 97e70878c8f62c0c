"""Helpers shared by the benchmarks: machine description and expert datasets."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from fedbot.recording import open_store, record_episodes
from hardware.pusht_expert import PushTExpert, PushTExpertConfig
from hardware.pusht_sim import PushTSim, PushTSimConfig


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}"


def expert_dataset(root: Path, episodes: int, style: str = "default", seed_start: int = 0) -> Path:
    """Record `episodes` expert attempts into `root` unless it already holds a dataset."""
    if (root / "meta" / "info.json").exists():
        return root
    robot = PushTSim(PushTSimConfig(id=root.name))
    robot.connect()
    operator = PushTExpert(PushTExpertConfig(id="bench", style=style, seed=seed_start))
    operator.connect()
    operator.attach(robot)
    store = open_store(root, robot)
    try:
        record_episodes(robot, operator, store, episodes=episodes, seed_start=seed_start)
    finally:
        store.close()
        robot.disconnect()
    return root
