"""The agent of one robot: its life cycle, state machine, recording, policy runs, status and watchdog.

It owns one robot, its private dataset, its SuperNode and its live controller. States, each
transition logged and shown in `fedbot status` and systemd's STATUS:

    idle            the control loop holds; the SuperNode starts once the idle rules hold
    recording       a teleop session drives the robot and commits episodes to the dataset
    running-policy  the control loop runs the live policy
    federating      the robot's flower-supernode is up and trains when the coordinator asks

Recording and running the policy preempt federating: the SuperNode gets SIGTERM and leaves. New
models arriving in the inbox are checked and hot-swapped in any state.

A robot whose serial port or camera fails (`HardwareFault`) loses the episode in progress; the
fault shows in `fedbot status` and the agent reconnects the robot once the device is back.
Recording and policy runs are refused until then; federating does not need the robot and goes on.

It composes these parts, which get what they need from it as arguments and callbacks; its lock
(`_lock`) guards state changes:

    agent/controller.py        the control loop, ticking at a fixed rate, that runs the live policy
    agent/model_updates.py     new models: inbox, checks, sim gate, swap into the loop, rollback
    agent/federation.py        the idle rules and the SuperNode (agent/supernode.py), restarted with back-off
    agent/control_requests.py  the control API's commands (agent/control_api.py serves the socket)
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from pathlib import Path

from agent.config import AgentConfig
from agent.control_requests import ControlRequests
from agent.controller import RUN, ControlLoop
from agent.federation import Federation
from agent.model_store import CheckRules, ModelStore
from agent.model_updates import ModelUpdates
from fedbot import service
from fedbot.atomic_files import write_json_atomic
from fedbot.episode_store import committed_episodes
from fedbot.recording import (
    EVAL_SEED_START,
    check_recording_seeds,
    record_session,
)
from hardware.errors import HardwareFault
from hardware.factory import make_robot, make_teleop

log = logging.getLogger("fedbot.agent")
IDLE, RECORDING, RUNNING, FEDERATING = "idle", "recording", "running-policy", "federating"
SUPERVISE_PERIOD = 0.5  # seconds between checks of the robot, the policy run, the SuperNode and the idle rules
RECONNECT_PERIOD = 1.0  # seconds between attempts to reconnect a robot whose device failed


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = IDLE
        self.robot = make_robot(config.robot.type, config.robot_id, **config.robot_settings())
        self.control = ControlLoop(self.robot, config.control.rate_hz, config.control.inference_threads)
        self.models = ModelStore(config.model_dir, config.checks.keep_models)
        rules = CheckRules.of(config.checks, config.control.device)
        self.updates = ModelUpdates(self.models, self.control, rules, self._robot_features, self._report_status)
        self.federation = Federation(config, self.models.inbox)
        self.requests = ControlRequests(
            status=self.status,
            models=self.models,
            record=self.record,
            run=self.run,
            stop=self.stop,
            rollback=self.updates.rollback,
        )
        self.last_run: dict | None = None
        self.recording: dict | None = None
        self._lock = threading.RLock()  # guards state changes
        self._stopping = threading.Event()
        self._next_reconnect = 0.0
        self._threads: list[threading.Thread] = []

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect the hardware, load the live model, start the loops (agent/main.py then says READY)."""
        self.config.dataset_root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.robot.connect()
        except HardwareFault as fault:
            log.error("robot not connected (%s); trying again every %.0f s", fault, RECONNECT_PERIOD)
        self.updates.load_live()
        # Python's cyclic garbage collector stops every thread while it walks all objects; with torch
        # and lerobot loaded a full pass took 260 ms (7 missed ticks at 30 Hz), triggered by loading a
        # model. Objects alive now (modules, the live model) are moved out of its reach.
        gc.collect()
        gc.freeze()
        self.control.start()
        self.updates.start()
        for target, name in (
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
        self.updates.close()
        with self._lock:
            self.federation.leave()
        self.control.close()
        self.robot.disconnect()  # an arm holds, then turns its torque off joint by joint
        log.info("agent stopped")

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
        self._report_status()

    def _robot_features(self) -> dict[str, tuple]:
        return {**self.robot.observation_features, **self.robot.action_features}

    # -- states -------------------------------------------------------------------------------------
    def _enter(self, state: str, why: str) -> None:
        if state != self.state:
            log.info("state: %s -> %s (%s)", self.state, state, why)
            self.state = state
        self._report_status()

    def _leave_federation(self, why: str) -> None:
        if self.state == FEDERATING:
            self.federation.leave()
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
                self.federation.start_cooldown(time.monotonic())
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
                self.federation.start_cooldown(time.monotonic())
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
                self.federation.start_cooldown(time.monotonic())
                self._enter(IDLE, "stopped")
        return {"state": self.state}

    # -- supervision ----------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_PERIOD):
            with self._lock:
                now = time.monotonic()
                if not self.robot.is_connected and now >= self._next_reconnect:
                    self._reconnect(now)
                if self.state == RUNNING and self.control.mode != RUN:
                    self.federation.start_cooldown(now)
                    self._enter(IDLE, f"the policy run ended: {self.control.error or 'stopped'}")
                if self.state == FEDERATING:
                    if self.federation.supernode_exited(now):
                        self._enter(IDLE, "SuperNode exited")
                elif self.state == IDLE and self.federation.may_join(now):
                    self.federation.join(now)
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

    def _report_status(self) -> None:
        """The status line to systemd (`systemctl status`)."""
        service.notify_status(self.status_line())

    def status(self) -> dict:
        rounds = self.federation.rounds()
        return {
            "robot": self.config.robot_id,
            "state": self.state,
            "live-model": self.updates.live_summary(),
            "episodes": committed_episodes(self.config.dataset_root),
            "robot-connected": self.robot.is_connected,
            "hardware-fault": None if self.robot.is_connected else getattr(self.robot, "fault", None),
            "recording": self.recording,
            "rounds-joined": len(rounds),
            "last-round": rounds[-1] if rounds else None,
            "federation": self.federation.status(),
            "control": {**self.control.timing(), "mode": self.control.mode, "policy-error": self.control.error},
            "last-swap": self.updates.last_swap,
            "last-run": self.last_run,
            "rejected": self.models.rejections()[:5],
        }

    def handle(self, request: dict) -> dict:
        """One control API request (agent/control_api.py), dispatched by agent/control_requests.py."""
        return self.requests.handle(request)


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default
