"""`fedbot sim`: the simulated fleet dry run over the real Flower deployment engine.

On localhost: one `fedbot-coordinator` (SuperLink + ServerApp) and N `fedbot-agent --sim` daemons.
Each robot records demonstrations with the sim operator in its own style, goes idle, joins as a
SuperNode, trains the rounds, receives the final global model in its inbox, checks and hot-swaps it
into its live controller, and runs policy episodes. Everything goes to one directory:

    <out>/<date_time>/
        summary.json                   per robot: episodes, rounds joined, live model sha256, success
        coordinator.log, coordinator/  the coordinator's log and SuperLink state
        federation/<date_time>/        global models + registry, metrics.jsonl/png, evaluation videos
        robots/robotN/                 agent.toml, agent.log, data/ (dataset, models, SuperNode log)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.config import (
    AgentConfig,
    ChecksSection,
    ControlSection,
    CoordinatorSection,
    IdleSection,
    RobotSection,
    TeleopSection,
)
from fedbot.atomic_files import write_json_atomic
from fedbot.control_client import request
from fedbot.flower_processes import BIN, free_port
from fedbot.model_manifest import generate_key
from fedbot.run_config import RunConfig
from fedbot.scenes import EVAL_SEED_START
from fedbot.typed_config import changed_keys, write_toml

STARTUP_TIMEOUT = 300.0
DEPLOY_TIMEOUT = 300.0
ROUND_LINE = re.compile(r"round \d+: (training on|\{)|run ended|Traceback|error", re.IGNORECASE)


@dataclass(frozen=True)
class FleetSettings:
    robots: int = 2
    episodes: int = 16  # demonstrations each robot records
    rounds: int = 4
    local_steps: int = 250
    policy_episodes: int = 3  # episodes each robot runs with its live model at the end
    eval_episodes: int = 10  # held-out scenes of the server-side evaluation after each round (the same each round)
    split_scenes: bool = False  # robot i records only scene part i of `robots` (non-IID scenes)
    out: Path = Path("outputs")


def _agent_config(
    directory: Path, name: str, style: str, superlink: str, part: tuple[int, int], trusted_key: str
) -> Path:
    """The robot's agent file: data and socket beside it, idle as soon as it recorded an episode,
    trusting models signed by the coordinator's key."""
    config = AgentConfig(
        robot_id=name,
        data_dir=Path("data"),
        socket=Path("agent.sock"),
        robot=RobotSection(scene_part=part[0], scene_parts=part[1]),
        teleop=TeleopSection(style=style),
        coordinator=CoordinatorSection(superlink=superlink, supernode_port=free_port()),
        idle=IdleSection(min_new_episodes=1, cooldown_seconds=0.0),
        control=ControlSection(rate_hz=10.0),
        checks=ChecksSection(trusted_keys=[trusted_key]),
    )
    write_toml(directory / "agent.toml", config)
    return directory / "agent.toml"


class Fleet:
    def __init__(self, settings: FleetSettings, console: Console):
        self.settings = settings
        self.console = console
        self.run_dir = Path(settings.out) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.robots: list[Path] = []
        self.coordinator: subprocess.Popen | None = None

    def _spawn(self, command: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SVT_LOG": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
        env.pop("NOTIFY_SOCKET", None)
        with open(log_path, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def start(self) -> None:
        from hardware.pusht_expert import STYLES

        styles = sorted(STYLES)
        s = self.settings
        self.run_dir.mkdir(parents=True)
        signing_key = self.run_dir / "coordinator" / "signing.key"  # the robots trust its public half
        trusted = generate_key(signing_key, "fedbot-coordinator")
        run_config = changed_keys(
            RunConfig(
                num_server_rounds=s.rounds,
                min_nodes=s.robots,
                local_steps=s.local_steps,
                eval_episodes=s.eval_episodes,
                fraction_evaluate=0.0,
                signing_key=str(signing_key.resolve()),
            )
        )
        self.coordinator = self._spawn(
            [
                str(BIN / "fedbot-coordinator"),
                "run",
                "--state-dir",
                str(self.run_dir / "coordinator"),
                "--port",
                str(self.port),
                "--output-dir",
                str(self.run_dir / "federation"),
                "--run-config",
                run_config,
            ],
            self.run_dir / "coordinator.log",
        )
        threading.Thread(target=self._show_rounds, daemon=True).start()
        for i in range(s.robots):
            directory = self.run_dir / "robots" / f"robot{i}"
            directory.mkdir(parents=True)
            part = (i, s.robots) if s.split_scenes else (0, 1)
            style, superlink = styles[i % len(styles)], f"127.0.0.1:{self.port}"
            config = _agent_config(directory, f"robot{i}", style, superlink, part, trusted)
            self._spawn([str(BIN / "fedbot-agent"), "--sim", "--config", str(config)], directory / "agent.log")
            self.robots.append(directory)
        for robot in self.robots:
            self._wait_for_agent(robot)
        self.console.print(
            f"coordinator on 127.0.0.1:{self.port}; {s.robots} agents up "
            f"(styles {', '.join(styles[i % len(styles)] for i in range(s.robots))})"
        )

    def _wait_for_agent(self, robot: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                request(robot / "agent.sock", "status", timeout=30)
                return
            except (RuntimeError, OSError):
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                    raise RuntimeError(f"the agent in {robot} did not come up; see {robot / 'agent.log'}") from None
                time.sleep(0.5)  # the agent process is still importing torch and lerobot

    def _show_rounds(self) -> None:
        """Echo the coordinator's round lines as they are written."""
        path = self.run_dir / "coordinator.log"
        with open(path) as log_file:
            while True:
                line = log_file.readline()
                if not line:
                    if self.coordinator.poll() is not None:
                        return
                    time.sleep(0.5)  # tail -f
                    continue
                if ROUND_LINE.search(line):
                    message = line.rstrip().split(": ", 1)[-1]  # without the time and logger name
                    self.console.print(f"[dim]coordinator[/] {message[:300]}", highlight=False)

    def on_each_robot(self, command: str, **arguments) -> list[dict]:
        with ThreadPoolExecutor(len(self.robots)) as pool:
            return list(pool.map(lambda robot: request(robot / "agent.sock", command, **arguments), self.robots))

    def wait_for_deployment(self) -> None:
        """Until the coordinator's run ended and every robot runs the final global model."""
        code = self.coordinator.wait()
        if code != 0:
            raise RuntimeError(f"the coordinator exited with {code}; see {self.run_dir / 'coordinator.log'}")
        deadline = time.monotonic() + DEPLOY_TIMEOUT
        while True:
            statuses = self.on_each_robot("status")
            if all(s["live-model"] is not None and s["live-model"]["round"] == self.settings.rounds for s in statuses):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the final model did not go live on every robot: "
                    f"{[s['live-model'] for s in statuses]}; see the agent logs"
                )
            time.sleep(1.0)  # the deploy message travels and each agent checks the model

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()


def run_fleet(settings: FleetSettings, console: Console) -> dict:
    fleet = Fleet(settings, console)
    console.rule(f"[bold]fedbot sim[/]: {settings.robots} robots -> {fleet.run_dir}")
    try:
        fleet.start()
        console.print(f"recording {settings.episodes} demonstrations on each robot")
        recorded = fleet.on_each_robot("record", episodes=settings.episodes)
        kept = ", ".join(f"robot{i} {r['kept']}/{r['attempted']}" for i, r in enumerate(recorded))
        console.print(f"recorded (kept/attempted): {kept}")
        console.print(f"robots idle: they join the federation for {settings.rounds} rounds")
        fleet.wait_for_deployment()
        console.print(f"final global model live on every robot; {settings.policy_episodes} policy episodes each")
        after = (
            fleet.on_each_robot("run", episodes=settings.policy_episodes, seed=EVAL_SEED_START)
            if settings.policy_episodes
            else [None] * settings.robots
        )
        statuses = fleet.on_each_robot("status")
    finally:
        fleet.close()
    summary = {
        "run-dir": str(fleet.run_dir),
        "federation": str(fleet.run_dir / "federation"),
        "rounds": global_model_per_round(fleet.run_dir / "federation"),
        "robots": [],
    }
    for i, (run, status) in enumerate(zip(after, statuses, strict=True)):
        summary["robots"].append(
            {
                "robot": f"robot{i}",
                "episodes": status["episodes"],
                "rounds-joined": status["rounds-joined"],
                "live-model": status["live-model"]["name"],
                "live-model-sha256": status["live-model"]["sha256"],
                "success-before": None,  # every robot of a dry run starts fresh, without a model
                "success-after": None if run is None else run["success-rate"],
                "policy-episodes": 0 if run is None else run["episodes"],
                "missed-ticks": status["control"]["missed"],
            }
        )
    write_json_atomic(fleet.run_dir / "summary.json", summary)
    console.print(rounds_table(summary["rounds"], settings.eval_episodes))
    console.print(summary_table(summary))
    console.print(f"outputs: {fleet.run_dir} (summary.json; federation/: global models, metrics.png, videos)")
    return summary


def global_model_per_round(federation: Path) -> list[dict]:
    """The global model after each round, from the run's metrics.jsonl: robots, loss, and success and
    mean max coverage on the held-out seeds of the server-side evaluation."""
    (metrics,) = federation.glob("*/metrics.jsonl")
    keys = {
        "round": "round",
        "robots": "robots",
        "train-loss": "train-loss",
        "success": "server-success-rate",
        "coverage": "server-mean-max-coverage",
    }
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{name: row.get(key) for name, key in keys.items()} for row in rows]


def rounds_table(rounds: list[dict], eval_episodes: int) -> Table:
    table = Table(title=f"global model per round ({eval_episodes} held-out scenes each)")
    for column in ("round", "robots", "train loss", "success", "mean max coverage"):
        table.add_column(column, justify="right")
    for row in rounds:
        evaluated = row["coverage"] is not None
        table.add_row(
            str(row["round"]),
            str(row["robots"]),
            f"{row['train-loss']:.4f}",
            f"{row['success']:.0%}" if evaluated else "-",
            f"{row['coverage']:.3f}" if evaluated else "-",
        )
    return table


def summary_table(summary: dict) -> Table:
    table = Table(title="fleet summary")
    for column in ("robot", "episodes", "rounds joined", "live model", "success before", "success after"):
        table.add_column(column, no_wrap=column == "live model")
    for row in summary["robots"]:
        after = "not run" if row["success-after"] is None else f"{row['success-after']:.0%} of {row['policy-episodes']}"
        table.add_row(
            row["robot"], str(row["episodes"]), str(row["rounds-joined"]), row["live-model"], "no model", after
        )
    return table
