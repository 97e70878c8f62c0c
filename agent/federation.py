"""When the robot federates: the idle rules, and the supervision of its SuperNode with restart back-off.

The robot joins the federation (its SuperNode runs, agent/supernode.py) while it is idle and the
`[idle]` rules hold: new episodes since its last round, the allowed hours, a cooldown after the
last recording or policy run. A SuperNode that exits (coordinator unreachable for good, robot
refused) is restarted after an exponential back-off; one that stayed up a while resets it.

The agent's state machine (agent/daemon.py) makes and logs the transitions; it calls the methods
that start, stop or restart the SuperNode with its lock held. A SuperNode that cannot even be
started (its log or state directory unwritable, say) raises: the supervisor shows it as a fault,
and the next start waits for the same back-off as after an exit. A stop is bounded: SIGTERM, then
SIGKILL to the whole process group after SUPERNODE_STOP seconds (Flower's own processes force
their exit after 5 s).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from agent.config import AgentConfig, IdleSection
from agent.supernode import SuperNode, SuperNodeSettings, rounds_joined
from fedbot.episode_store import committed_episodes
from fedbot.retention import LogRotation

log = logging.getLogger("fedbot.agent")
STABLE_SUPERNODE = 60.0  # a SuperNode up this long resets the restart back-off
SUPERNODE_STOP = 15.0  # seconds a SuperNode gets to leave after SIGTERM before SIGKILL


class Federation:
    """This robot's SuperNode, when it may run, and its restarts."""

    def __init__(self, config: AgentConfig, model_inbox: Path):
        self.config = config
        self.supernode = SuperNode(
            SuperNodeSettings(
                superlink=config.coordinator.superlink,
                dataset_root=config.dataset_root,
                model_inbox=model_inbox,
                output_dir=config.federation_dir,
                robot_id=config.robot_id,
                keep_rounds=config.retention.rounds,
                port=config.coordinator.supernode_port,
                root_certificates=config.coordinator.root_certificates,
                auth_key=config.coordinator.auth_key,
            ),
            config.data_dir / "supernode",
            LogRotation(config.retention.log_max_mb, config.retention.log_backups),
        )
        self.failures = 0  # SuperNode exits since it last ran stably
        self._quiet_since = time.monotonic()  # end of the last recording or policy run (cooldown)
        self._started = 0.0
        self._next_start = 0.0

    def start_cooldown(self, now: float) -> None:
        """A recording or policy run ended at `now`: the cooldown of the idle rules starts."""
        self._quiet_since = now

    def idle_blockers(self) -> list[str]:
        """Why the robot may not join the federation now (empty: it may)."""
        rules, blockers = self.config.idle, []
        data = data_blocker(committed_episodes(self.config.dataset_root), self.rounds(), rules, time.time())
        if data:
            blockers.append(data)
        if not within_hours(datetime.now().hour, rules.hours):
            blockers.append(f"outside the allowed hours {rules.hours[0]}-{rules.hours[1]}")
        quiet = time.monotonic() - self._quiet_since
        if quiet < rules.cooldown_seconds:
            blockers.append(f"cooling down ({rules.cooldown_seconds - quiet:.0f} s left)")
        return blockers

    def may_join(self, now: float) -> bool:
        """For an idle robot: the restart back-off is over and the idle rules hold."""
        return now >= self._next_start and not self.idle_blockers()

    def join(self, now: float) -> None:
        try:
            self.supernode.start()
        except BaseException:
            self._schedule_restart(now)
            raise
        self._started = now

    def leave(self, timeout: float = SUPERNODE_STOP) -> None:
        """SIGTERM to the SuperNode, SIGKILL after `timeout` seconds (none running: nothing to do)."""
        self.supernode.stop(timeout)

    def _schedule_restart(self, now: float) -> float:
        self.failures += 1
        delay = min(2.0**self.failures, self.config.coordinator.retry_max_seconds)
        self._next_start = now + delay
        return delay

    def supernode_exited(self, now: float) -> bool:
        """For a federating robot, once per supervision: whether its SuperNode has exited. If it has,
        its restart is scheduled with back-off; if it has run stably, the back-off is reset."""
        if not self.supernode.alive():
            code = self.supernode.exit_code()
            self.supernode.stop(SUPERNODE_STOP)
            delay = self._schedule_restart(now)
            log.warning(
                "SuperNode exited with code %s (see %s); trying again in %.0f s",
                code,
                self.supernode.log_path,
                delay,
            )
            return True
        if now - self._started > STABLE_SUPERNODE:
            self.failures = 0
        return False

    def rounds(self) -> list[dict]:
        """The rounds this robot trained in, oldest first (agent/supernode.py)."""
        return rounds_joined(self.config.federation_dir)

    def status(self) -> dict:
        process = self.supernode.process  # read once: a stop may set it to None meanwhile
        return {
            "supernode-pid": process.pid if process is not None and process.poll() is None else None,
            "failures": self.failures,
            "blocked-by": self.idle_blockers(),
        }


def data_blocker(episodes: int, rounds: list[dict], rules: IdleSection, now: float) -> str | None:
    """Why the robot's data keeps it out of the federation (None: it may join): no episodes, or fewer
    new ones since its last round than min-new-episodes, unless that round is more than
    check-in-hours ago (`now`, like a round's time, in seconds since the epoch): then it joins anyway,
    to be counted in the next run's census and to receive a model it missed."""
    if episodes == 0:
        return "no episodes recorded"
    new = episodes - (rounds[-1]["episodes"] if rounds else 0)
    if new >= rules.min_new_episodes:
        return None
    if rounds and now - rounds[-1]["time"] > rules.check_in_hours * 3600:
        return None
    return f"{new} new episodes since the last round, {rules.min_new_episodes} needed"


def within_hours(hour: int, hours: list[int]) -> bool:
    """Whether `hour` (0-23) lies in the idle rule's [start, end); start > end spans midnight (22-6)."""
    start, end = hours
    return start <= hour < end if start <= end else hour >= start or hour < end
