"""Helpers shared by the benchmarks: machine description, expert datasets, a localhost federation."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path

from agent.supernode import BIN, SuperNodeSettings
from fedbot.presets import Preset, get_preset
from fedbot.recording import dataset_features, open_store, record_episodes
from hardware.pusht_expert import PushTExpert, PushTExpertConfig
from hardware.pusht_sim import PushTSim, PushTSimConfig


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}"


def preset_features(name: str) -> dict:
    """Dataset features to build a preset's policy for: the PushT sim's, or an SO arm with one
    640x480 camera (hardware/so_arm.py names) for the so-arm presets."""
    if name.startswith("so-arm"):
        return {"observation.state": {"dtype": "float32", "shape": (6,), "names": None},
                "observation.images.front": {"dtype": "video", "shape": (480, 640, 3),
                                             "names": ["height", "width", "channels"]},
                "action": {"dtype": "float32", "shape": (6,), "names": None}}
    return dataset_features(PushTSim(PushTSimConfig(id="bench")))


def preset_with(name: str, settings: list[str]) -> Preset:
    """A preset with DiffusionConfig fields changed for a trial: ["kernel_size=3", "down_dims=[48,96,192]"]
    (values in JSON). Lists become tuples, as the presets write them."""
    changes = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        parsed = json.loads(value)
        changes[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    preset = get_preset(name)
    return dataclasses.replace(preset, config={**preset.config, **changes}) if changes else preset


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_federation(work: Path, datasets: list[Path], run_config: str) -> list[dict]:
    """A real localhost deployment: `fedbot-coordinator` (its SuperLink) and one SuperNode per dataset,
    started as the agent starts them. Returns the run's metrics.jsonl rows."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    coordinator = subprocess.Popen(
        [str(BIN / "fedbot-coordinator"), "run", "--state-dir", str(work / "coordinator"), "--port", str(port),
         "--output-dir", str(work / "outputs"), "--run-config", run_config],
        stdout=open(work / "coordinator.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    robots = []
    for i, dataset in enumerate(datasets):
        settings = SuperNodeSettings(superlink=f"127.0.0.1:{port}", dataset_root=dataset,
                                     model_inbox=work / f"robot{i}-inbox", output_dir=work / f"robot{i}-outputs",
                                     robot_id=f"robot{i}", port=free_port())
        robots.append(subprocess.Popen(
            settings.command(), stdout=open(work / f"robot{i}.log", "w"), stderr=subprocess.STDOUT,
            env={**env, **settings.environment(work / f"robot{i}")}, start_new_session=True))
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
