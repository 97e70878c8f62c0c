"""Helpers shared by the benchmarks: machine description, expert datasets, a localhost federation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lerobot.datasets.aggregate import aggregate_datasets

from agent.supernode import SuperNodeSettings
from fedbot.flower_processes import BIN, free_port
from fedbot.presets import Preset, get_preset
from fedbot.process_group import stop_with_sessions_below
from fedbot.recording import dataset_features, record_session
from fedbot.session_plan import SessionPlan
from hardware.pusht_expert import STYLES, PushTExpert, PushTExpertConfig
from hardware.pusht_sim import PushTSim, PushTSimConfig


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}"


def preset_features(name: str) -> dict:
    """Dataset features to build a preset's policy for: the PushT sim's, or an SO arm with one
    640x480 camera (hardware/so_arm.py names) for the so-arm presets."""
    if name.startswith("so-arm"):
        return {
            "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
            "observation.images.front": {
                "dtype": "video",
                "shape": (480, 640, 3),
                "names": ["height", "width", "channels"],
            },
            "action": {"dtype": "float32", "shape": (6,), "names": None},
        }
    return dataset_features(PushTSim(PushTSimConfig(id="bench")))


def preset_with(name: str, settings: list[str]) -> Preset:
    """A preset with fields changed for a trial: Preset fields (batch_size, ema_power) or DiffusionConfig
    fields, ["kernel_size=3", "down_dims=[48,96,192]", "ema_power=0.75"] (values in JSON). Lists become
    tuples, as the presets write them."""
    preset = get_preset(name)
    own = {f.name for f in dataclasses.fields(Preset)}
    changes, config = {}, dict(preset.config)
    for setting in settings:
        key, value = setting.split("=", 1)
        parsed = json.loads(value)
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        if key in own:
            changes[key] = parsed
        else:
            config[key] = parsed
    return dataclasses.replace(preset, config=config, **changes)


def expert_dataset(
    root: Path, episodes: int, style: str = "default", seed_start: int = 0, part: tuple[int, int] = (0, 1)
) -> Path:
    """Record `episodes` expert attempts into `root` unless it already holds a dataset; `part`:
    (scene part, parts) of the robot's scenes (hardware/pusht_sim.py)."""
    if (root / "meta" / "info.json").exists():
        return root
    robot = PushTSim(PushTSimConfig(id=root.name, scene_part=part[0], scene_parts=part[1]))
    robot.connect()
    try:
        record_session(
            robot,
            PushTExpert(PushTExpertConfig(id="bench", style=style, seed=seed_start)),
            root,
            SessionPlan(episodes, seed_start),
        )
    finally:
        robot.disconnect()
    return root


def fleet_datasets(work: Path, robots: int, episodes: int, split_scenes: bool) -> list[Path]:
    """One expert dataset per simulated robot, as `fedbot sim` records them: robot i has operator style
    i (in sorted order), recording seeds from i * 1000 and, with `split_scenes`, scene part i of `robots`."""
    styles = sorted(STYLES)
    return [
        expert_dataset(
            work / f"robot{i}",
            episodes,
            style=styles[i % len(styles)],
            seed_start=i * 1000,
            part=(i, robots) if split_scenes else (0, 1),
        )
        for i in range(robots)
    ]


def pooled_dataset(root: Path, datasets: list[Path]) -> Path:
    """The robots' episodes in one dataset (lerobot's aggregate_datasets), unless `root` holds it.
    Built beside `root` and renamed into place: a bench stopped while it copies leaves no half dataset."""
    if not root.exists():
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        aggregate_datasets(
            [f"fedbot/{d.name}" for d in datasets], f"fedbot/{root.name}", roots=datasets, aggr_root=partial
        )
        partial.rename(root)
    return root


@contextlib.contextmanager
def localhost_deployment(work: Path, datasets: list[Path], run_config: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A real localhost deployment: `fedbot-coordinator run` (its SuperLink, state in <work>/coordinator,
    runs in <work>/outputs) and SuperNode robot<i> on datasets[i], started as the agent starts them.
    Yields the coordinator's process and its output directory; leaving stops every process. The same
    `work` again resumes the coordinator's unfinished run."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    coordinator = subprocess.Popen(
        [
            str(BIN / "fedbot-coordinator"),
            "run",
            "--state-dir",
            str(work / "coordinator"),
            "--port",
            str(port),
            "--output-dir",
            str(work / "outputs"),
            "--run-config",
            run_config,
        ],
        stdout=open(work / "coordinator.log", "a"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    robots = []
    for i, dataset in enumerate(datasets):
        settings = SuperNodeSettings(
            superlink=f"127.0.0.1:{port}",
            dataset_root=dataset,
            model_inbox=work / f"robot{i}-inbox",
            output_dir=work / f"robot{i}-outputs",
            robot_id=f"robot{i}",
            port=free_port(),
        )
        robots.append(
            subprocess.Popen(
                settings.command(),
                stdout=open(work / f"robot{i}.log", "a"),
                stderr=subprocess.STDOUT,
                env={**env, **settings.environment(work / f"robot{i}")},
                start_new_session=True,
            )
        )
    try:
        yield coordinator, work / "outputs"
    finally:
        for process in [coordinator, *robots]:
            stop_with_sessions_below(process, timeout=60)


def run_federation(work: Path, datasets: list[Path], run_config: str) -> list[dict]:
    """A new localhost deployment's run to its end (`localhost_deployment`); its metrics.jsonl rows."""
    shutil.rmtree(work, ignore_errors=True)
    with localhost_deployment(work, datasets, run_config) as (coordinator, outputs):
        if coordinator.wait(timeout=3600) != 0:
            raise RuntimeError(f"the coordinator failed; see {work / 'coordinator.log'}")
    (run_dir,) = [path for path in outputs.iterdir() if path.is_dir()]  # beside it: the signing key
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
