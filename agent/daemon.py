"""The agent: owns one robot, its private dataset, its SuperNode and its live controller.

States, each transition logged and shown in `fedbot status` and systemd's STATUS:

    idle            the control loop holds; the SuperNode starts once the idle rules hold
    recording       a teleop session drives the robot and commits episodes to the dataset
    running-policy  the control loop runs the live policy
    federating      the robot's flower-supernode is up and trains when the coordinator asks

Recording and running the policy preempt federating: the SuperNode gets SIGTERM and leaves. New
models arriving in the inbox are checked and hot-swapped in any state (agent/model_store.py).

A robot whose serial port or camera fails (`HardwareFault`) loses the episode in progress; the
fault shows in `fedbot status` and the agent reconnects the robot once the device is back.
Recording and policy runs are refused until then; federating does not need the robot and goes on.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import threading
import time
from datetime import datetime
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from agent.config import AgentConfig
from agent.controller import RUN, ControlLoop
from agent.model_store import (
    CheckRules,
    ModelRejected,
    ModelStore,
    check_model,
    read_manifest,
    sim_gate_success,
)
from agent.supernode import SuperNode, SuperNodeSettings, rounds_joined
from fedbot import service
from fedbot.atomic_files import write_json_atomic
from fedbot.episode_store import committed_episodes
from fedbot.policy_io import load_policy
from fedbot.recording import (
    EVAL_SEED_START,
    check_recording_seeds,
    record_session,
)
from hardware.errors import HardwareFault
from hardware.factory import make_robot, make_teleop

log = logging.getLogger("fedbot.agent")
IDLE, RECORDING, RUNNING, FEDERATING = "idle", "recording", "running-policy", "federating"
SUPERVISE_PERIOD = 0.5  # seconds between checks of the SuperNode and the idle rules
STABLE_SUPERNODE = 60.0  # a SuperNode up this long resets the restart back-off
SWAP_TIMEOUT = 60.0
RECONNECT_PERIOD = 1.0  # seconds between attempts to reconnect a robot whose device failed


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = IDLE
        self.robot = make_robot(config.robot.type, config.robot_id, **config.robot_settings())
        self.control = ControlLoop(self.robot, config.control.rate_hz, config.control.inference_threads)
        self.models = ModelStore(config.model_dir, config.checks.keep_models)
        self.rules = CheckRules(
            config.checks.sim_gate_episodes, config.checks.sim_gate_tolerance, config.control.device
        )
        self.supernode = SuperNode(
            SuperNodeSettings(
                superlink=config.coordinator.superlink,
                dataset_root=config.dataset_root,
                model_inbox=self.models.inbox,
                output_dir=config.federation_dir,
                robot_id=config.robot_id,
                port=config.coordinator.supernode_port,
                root_certificates=config.coordinator.root_certificates,
                auth_key=config.coordinator.auth_key,
            ),
            config.data_dir / "supernode",
        )
        self.last_swap: dict | None = None
        self.last_run: dict | None = None
        self.recording: dict | None = None
        self._lock = threading.RLock()  # guards state changes
        self._stopping = threading.Event()
        self._quiet_since = time.monotonic()  # end of the last recording or policy run (cooldown)
        self._supernode_failures = 0
        self._supernode_started = 0.0
        self._next_supernode_start = 0.0
        self._next_reconnect = 0.0
        self._landed: queue.Queue[tuple[str, float]] = queue.Queue()
        self._gate_scores: dict[str, float] = {}
        self._observer = Observer()
        self._threads: list[threading.Thread] = []

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect the hardware, load the live model, start the loops (agent/main.py then says READY)."""
        self.config.dataset_root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.robot.connect()
        except HardwareFault as fault:
            log.error("robot not connected (%s); trying again every %.0f s", fault, RECONNECT_PERIOD)
        self._load_live_model()
        # Python's cyclic garbage collector stops every thread while it walks all objects; with torch
        # and lerobot loaded a full pass took 260 ms (7 missed ticks at 30 Hz), triggered by loading a
        # model. Objects alive now (modules, the live model) are moved out of its reach.
        gc.collect()
        gc.freeze()
        self.control.start()
        self._observer.schedule(_InboxEvents(self._landed), str(self.models.inbox))
        self._observer.start()
        self._landed.put(("", time.monotonic()))  # models that landed while the agent was down
        for target, name in (
            (self._process_inbox, "models"),
            (self._supervise, "supervisor"),
            (self._feed_watchdog, "watchdog"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "agent for robot %s up: %s robot %s, live model %s, control at %.1f Hz",
            self.config.robot_id,
            self.config.robot.type,
            "connected" if self.robot.is_connected else "NOT connected",
            self.control.live_name,
            self.config.control.rate_hz,
        )

    def close(self) -> None:
        service.notify_stopping()
        self._stopping.set()
        self._landed.put(("", 0.0))
        with self._lock:
            self.supernode.stop()
        if self._observer.is_alive():
            self._observer.stop()
        self.control.close()
        self.robot.disconnect()  # an arm holds, then turns its torque off joint by joint
        log.info("agent stopped")

    def _load_live_model(self) -> None:
        """Load the newest model of the history that still passes its checks."""
        while (live := self.models.live()) is not None:
            try:
                loaded = check_model(live, self._robot_features(), self.rules)
            except ModelRejected as why:
                log.error("live model %s fails its checks now (%s); falling back to the one before", live.name, why)
                self.models.rolled_back()
                continue
            self.control.swap(loaded, live.name, time.monotonic())
            return

    def _require_robot(self) -> None:
        if not self.robot.is_connected:
            raise RuntimeError(
                f"the robot is not connected ({getattr(self.robot, 'fault', None) or 'starting'}); "
                "the agent reconnects it when the device is back"
            )

    def _reconnect(self, now: float) -> None:
        self._next_reconnect = now + RECONNECT_PERIOD
        try:
            self.robot.connect()
        except HardwareFault:
            return
        log.info("robot reconnected")
        service.notify_status(self.status_line())

    def _robot_features(self) -> dict[str, tuple]:
        return {**self.robot.observation_features, **self.robot.action_features}

    # -- states -------------------------------------------------------------------------------------
    def _enter(self, state: str, why: str) -> None:
        if state != self.state:
            log.info("state: %s -> %s (%s)", self.state, state, why)
            self.state = state
        service.notify_status(self.status_line())

    def _leave_federation(self, why: str) -> None:
        if self.state == FEDERATING:
            self.supernode.stop()
            self._enter(IDLE, why)

    def record(self, episodes: int, task: str | None = None) -> dict:
        """A teleop session on this robot; each successful episode is committed as it ends."""
        with self._lock:
            if self.state in (RECORDING, RUNNING):
                raise RuntimeError(f"the robot is {self.state}; `fedbot stop` first")
            self._require_robot()
            seed = self._next_seed()
            check_recording_seeds(seed, episodes)
            self._leave_federation("recording preempts federating")
            self.control.pause()
            self._enter(RECORDING, f"{episodes} episodes")
            self.recording = {"episodes": episodes, "done": 0, "kept": 0}
        try:
            report = self._record(episodes, seed, task or self.config.teleop.task)
        except HardwareFault as fault:
            done, kept = self.recording["done"], self.recording["kept"]
            raise RuntimeError(
                f"hardware fault, recording stopped after {done} of {episodes} episodes "
                f"({kept} kept; an unfinished episode is discarded): {fault}"
            ) from None
        finally:
            self.control.resume()
            with self._lock:
                self._quiet_since = time.monotonic()
                self.recording = None
                self._enter(IDLE, "recording finished")
        return {"attempted": report.attempted, "kept": report.kept, "episodes": report.total_episodes}

    def _record(self, episodes: int, seed: int, task: str):
        teleop = make_teleop(self.config.teleop.type, seed, **self.config.teleop_settings())

        def on_episode(scene: int, status) -> None:
            self._save_next_seed(scene + 1)
            self.recording["done"] += 1
            kept = status.success is not False
            self.recording["kept"] += kept
            log.info("recorded scene %d: %s", scene, "kept" if kept else "failed, not kept")

        return record_session(
            self.robot,
            teleop,
            self.config.dataset_root,
            episodes=episodes,
            seed_start=seed,
            task=task,
            on_episode=on_episode,
        )

    def _next_seed(self) -> int:
        path = self.config.data_dir / "recording.json"
        return int(_read_json(path, {}).get("next-seed", 0))

    def _save_next_seed(self, seed: int) -> None:
        write_json_atomic(self.config.data_dir / "recording.json", {"next-seed": seed})

    def run(self, episodes: int | None = None, seed: int = EVAL_SEED_START) -> dict:
        """Run the live policy; with `episodes`, block until that many sim episodes are judged."""
        with self._lock:
            if self.state == RECORDING:
                raise RuntimeError("the robot is recording; wait for the session to end")
            if not self.control.has_policy:
                raise RuntimeError("no live model yet: nothing to run")
            self._require_robot()
            self._leave_federation("running the policy preempts federating")
            episode_run = self.control.run(episodes, seed)
            self._enter(RUNNING, "policy runs" + (f" for {episodes} episodes" if episodes else ""))
        if episodes is None:
            return {"running": True}
        episode_run.finished.wait()
        with self._lock:
            results = episode_run.results
            judged = [r["success"] for r in results if r["success"] is not None]  # a real bench judges none
            self.last_run = {
                "episodes": len(results),
                "seed-start": seed,
                "models": sorted({r["model"] for r in results}),
                "success-rate": sum(judged) / len(judged) if judged else None,
                "error": self.control.error,
                "results": results,
            }
            if self.state == RUNNING:
                self._quiet_since = time.monotonic()
                self._enter(IDLE, "policy episodes done")
        return self.last_run

    def stop(self) -> dict:
        """Hold; an arm then turns its torque off joint by joint (the next run or recording turns it on)."""
        with self._lock:
            self.control.hold()
            if hasattr(self.robot, "torque_off") and self.robot.is_connected:
                try:
                    self.robot.torque_off()
                except HardwareFault as fault:
                    log.error("torque off failed: %s", fault)
            if self.state == RUNNING:
                self._quiet_since = time.monotonic()
                self._enter(IDLE, "stopped")
        return {"state": self.state}

    def rollback(self) -> dict:
        """Make the previously live model live again, checked and swapped like a new one."""
        previous = self.models.previous()
        if previous is None:
            raise RuntimeError("no previous model to roll back to")
        try:
            loaded = check_model(previous, self._robot_features(), self.rules)
        except ModelRejected as why:
            raise RuntimeError(f"the previous model {previous.name} fails its checks now: {why}") from None
        ticket = self.control.swap(loaded, previous.name, time.monotonic())
        if not ticket.done.wait(SWAP_TIMEOUT):
            raise RuntimeError("the control loop did not take the model")
        self.models.rolled_back()
        log.info("rolled back to %s", previous.name)
        return {"live": previous.name}

    # -- new models -----------------------------------------------------------------------------------
    def _process_inbox(self) -> None:
        while not self._stopping.is_set():
            name, landed_at = self._landed.get()
            landed = {name: landed_at}
            while not self._landed.empty():
                name, at = self._landed.get()
                landed[name] = at
            if self._stopping.is_set():
                return
            for model in self.models.pending():
                self._consider(model, landed.get(model.name, time.monotonic()))

    def _consider(self, model: Path, landed_at: float) -> None:
        log.info("new model %s: checking", model.name)
        try:
            loaded = check_model(model, self._robot_features(), self.rules)
            if self.rules.sim_gate_episodes > 0:
                self._sim_gate(model.name, loaded)
        except ModelRejected as why:
            log.warning("model %s rejected: %s", model.name, why)
            self.models.reject(model, str(why))
            service.notify_status(self.status_line())
            return
        stored = self.models.accept(model)
        ticket = self.control.swap(loaded, stored.name, landed_at)
        if not ticket.done.wait(SWAP_TIMEOUT):
            log.error("model %s was not taken by the control loop within %.0f s", stored.name, SWAP_TIMEOUT)
            return
        self.models.went_live(stored)
        self.last_swap = {
            "model": stored.name,
            "latency-ms": round(ticket.latency * 1e3, 1),
            "tick": ticket.installed_tick,
        }
        log.info(
            "model %s is live (%.1f ms from landing to the first tick on its weights)",
            stored.name,
            ticket.latency * 1e3,
        )
        service.notify_status(self.status_line())

    def _sim_gate(self, name: str, loaded) -> None:
        episodes, tolerance = self.rules.sim_gate_episodes, self.rules.sim_gate_tolerance
        candidate = sim_gate_success(loaded, episodes)
        live = self.models.live()
        if live is None:
            log.info("sim gate: %s succeeds on %.0f%% (no live model to compare)", name, candidate * 100)
            return
        if live.name not in self._gate_scores:
            self._gate_scores[live.name] = sim_gate_success(load_policy(live, self.rules.device), episodes)
        reference = self._gate_scores[live.name]
        log.info("sim gate: %s %.0f%%, live %s %.0f%%", name, candidate * 100, live.name, reference * 100)
        if candidate < reference - tolerance:
            raise ModelRejected(
                f"sim gate: success {candidate:.0%} on {episodes} scenes, the live model has "
                f"{reference:.0%} (tolerance {tolerance:.0%})"
            )
        self._gate_scores[name] = candidate

    # -- federation -----------------------------------------------------------------------------------
    def idle_blockers(self) -> list[str]:
        """Why the robot may not join the federation now (empty: it may)."""
        rules, blockers = self.config.idle, []
        episodes = committed_episodes(self.config.dataset_root)
        rounds = rounds_joined(self.config.federation_dir)
        new = episodes - (rounds[-1]["episodes"] if rounds else 0)
        if episodes == 0:
            blockers.append("no episodes recorded")
        elif new < rules.min_new_episodes:
            blockers.append(f"{new} new episodes since the last round, {rules.min_new_episodes} needed")
        if not within_hours(datetime.now().hour, rules.hours):
            blockers.append(f"outside the allowed hours {rules.hours[0]}-{rules.hours[1]}")
        quiet = time.monotonic() - self._quiet_since
        if quiet < rules.cooldown_seconds:
            blockers.append(f"cooling down ({rules.cooldown_seconds - quiet:.0f} s left)")
        return blockers

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_PERIOD):
            with self._lock:
                now = time.monotonic()
                if not self.robot.is_connected and now >= self._next_reconnect:
                    self._reconnect(now)
                if self.state == RUNNING and self.control.mode != RUN:
                    self._quiet_since = now
                    self._enter(IDLE, f"the policy run ended: {self.control.error or 'stopped'}")
                if self.state == FEDERATING and not self.supernode.alive():
                    code = self.supernode.exit_code()
                    self.supernode.stop()
                    self._supernode_failures += 1
                    delay = min(2.0**self._supernode_failures, self.config.coordinator.retry_max_seconds)
                    self._next_supernode_start = now + delay
                    log.warning(
                        "SuperNode exited with code %s (see %s); trying again in %.0f s",
                        code,
                        self.supernode.log_path,
                        delay,
                    )
                    self._enter(IDLE, "SuperNode exited")
                elif self.state == FEDERATING and now - self._supernode_started > STABLE_SUPERNODE:
                    self._supernode_failures = 0
                elif self.state == IDLE and now >= self._next_supernode_start and not self.idle_blockers():
                    self.supernode.start()
                    self._supernode_started = now
                    self._enter(FEDERATING, "idle rules hold")

    def _feed_watchdog(self) -> None:
        """Ping systemd's watchdog while the control loop ticks; a stalled loop gets the agent restarted."""
        interval = service.watchdog_interval()
        if interval is None:
            return
        while not self._stopping.wait(interval):
            if self.control.healthy():
                service.notify_watchdog()
            else:
                log.error("control loop stalled: not feeding the watchdog")

    # -- reports ----------------------------------------------------------------------------------------
    def status_line(self) -> str:
        fault = getattr(self.robot, "fault", None) if not self.robot.is_connected else None
        return f"{self.state}; live model {self.control.live_name or 'none'}" + (f"; FAULT {fault}" if fault else "")

    def status(self) -> dict:
        rounds = rounds_joined(self.config.federation_dir)
        live = self.models.live()
        return {
            "robot": self.config.robot_id,
            "state": self.state,
            "live-model": None if live is None else {"name": live.name, **_summary(read_manifest(live))},
            "episodes": committed_episodes(self.config.dataset_root),
            "robot-connected": self.robot.is_connected,
            "hardware-fault": None if self.robot.is_connected else getattr(self.robot, "fault", None),
            "recording": self.recording,
            "rounds-joined": len(rounds),
            "last-round": rounds[-1] if rounds else None,
            "federation": {
                "supernode-pid": self.supernode.process.pid if self.supernode.alive() else None,
                "failures": self._supernode_failures,
                "blocked-by": self.idle_blockers(),
            },
            "control": {**self.control.timing(), "mode": self.control.mode, "policy-error": self.control.error},
            "last-swap": self.last_swap,
            "last-run": self.last_run,
            "rejected": self.models.rejections()[:5],
        }

    def handle(self, request: dict) -> dict:
        """One control API request (agent/control_api.py)."""
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "models":
            return {"models": self.models.models(), "rejected": self.models.rejections()}
        if command == "record":
            return self.record(_positive(request, "episodes"), request.get("task"))
        if command == "run":
            episodes = request.get("episodes")
            return self.run(
                None if episodes is None else _positive(request, "episodes"), int(request.get("seed", EVAL_SEED_START))
            )
        if command == "stop":
            return self.stop()
        if command == "rollback":
            return self.rollback()
        raise ValueError(f"unknown command {command!r}")


class _InboxEvents(FileSystemEventHandler):
    """Model directories appear in the inbox by rename (agent/inbox.py) or by a copy into it."""

    def __init__(self, landed: queue.Queue):
        self.landed = landed

    def on_any_event(self, event) -> None:
        path = Path(event.dest_path or event.src_path) if event.event_type == "moved" else Path(event.src_path)
        if event.event_type in ("created", "moved"):
            self.landed.put((path.name, time.monotonic()))


def _summary(manifest: dict) -> dict:
    return {key: manifest[key] for key in ("round", "sha256", "time") if key in manifest}


def _positive(request: dict, key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def within_hours(hour: int, hours: list[int]) -> bool:
    """Whether `hour` (0-23) lies in the idle rule's [start, end); start > end spans midnight (22-6)."""
    start, end = hours
    return start <= hour < end if start <= end else hour >= start or hour < end
