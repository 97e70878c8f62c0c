"""`fedbot-coordinator`: the lab server's service around the federation.

    fedbot-coordinator serve --state-dir DIR [--every S] [--min-new-episodes N] [--keep-runs N] [options of run]
    fedbot-coordinator run --state-dir DIR [--tls DIR [--auth --register KEY.pub ... --register-dir DIR]]
                           [--run-config "k=v ..."]
    fedbot-coordinator run-now --state-dir DIR
    fedbot-coordinator status [--output-dir DIR] [--json]
    fedbot-coordinator credentials --out DIR --host HOST [--host HOST ...]

`run` starts and supervises a real `flower-superlink`, registers robots' keys, submits the Flower app
in this repository (`flwr run`) and streams its log. If the SuperLink dies, it is started again and
the run is submitted again: the ServerApp continues from its last saved global model and round
(coordinator/registry.py). The same happens when the whole coordinator is restarted (systemd).
`serve`, the service, does the same for run after run: one at its start and every `--every` seconds
(training only if the robots recorded `--min-new-episodes`; otherwise the run only sends the fleet's
latest model to the robots that lack it), and one at once on `run-now`. Each new run starts from the
fleet's latest published model (coordinator/lineage.py). After each run it deletes the runs older
than the newest `--keep-runs` that it no longer needs (coordinator/registry.py `prune_runs`). The
SuperLink's log, <state-dir>/superlink.log, is rotated at `--log-max-mb` (fedbot/retention.py).

Under systemd it is a `Type=notify` service (deploy/systemd/fedbot-coordinator.service): READY=1 once
robots can join, STATUS= on restarts and at the end of the run, STOPPING=1 on shutdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.credentials import make_server_certificate
from coordinator.superlink import CONNECTION, SuperLink, SuperLinkSettings
from fedbot.atomic_files import write_bytes_atomic
from fedbot.flower_processes import BIN, PROJECT, staged_app
from fedbot.retention import LogRotation
from fedbot.service import (
    configure_logging,
    notify_ready,
    notify_status,
    notify_stopping,
)

log = logging.getLogger("fedbot.coordinator")

RUN_ID = re.compile(r"Successfully started run (\d+)")
RUN_NOW = "run-now"  # in the state dir: `fedbot-coordinator run-now` asks the service for a run
TRIGGER_POLL_S = 1.0


class Stopped(Exception):
    """SIGTERM or SIGINT: shut down cleanly."""


def submit_and_stream(superlink: SuperLink, app: Path, run_config: list[str]) -> str | None:
    """`flwr run --stream`, its output copied to ours; returns the run's final status (None if lost).

    If the SuperLink dies meanwhile, the stream is cut so that the supervisor can restart it.
    """
    staged = staged_app(superlink.settings.state_dir / "app", app)
    command = [str(BIN / "flwr"), "run", str(staged), CONNECTION, "--stream"]
    for config in run_config:
        command += ["--run-config", config]
    stream = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=superlink.settings.environment()
    )

    def cut_when_superlink_dies() -> None:
        superlink.process.wait()
        if stream.poll() is None:
            stream.terminate()

    threading.Thread(target=cut_when_superlink_dies, daemon=True).start()
    run_id = None
    try:
        for line in stream.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (match := RUN_ID.search(line)):
                run_id = match.group(1)
    finally:
        if stream.poll() is None:
            stream.terminate()
        stream.wait()
    if run_id is None or not superlink.alive():
        return None
    runs = superlink.flwr_json("ls", "--run-id", run_id).get("runs", [])
    return runs[0]["status"] if runs else None


@dataclass(frozen=True)
class Schedule:
    """When `serve` starts runs: every `every` seconds (from one start to the next, the first at
    once), each training only if the robots recorded `min_new_episodes` since the fleet's model;
    and at once, training whatever the data, when `run_now` appears (`fedbot-coordinator run-now`).
    After each run, the runs in `output_dir` older than the newest `keep_runs` go (`prune_runs`)."""

    every: float
    min_new_episodes: int
    run_now: Path
    output_dir: Path
    keep_runs: int

    def wait(self, last_start: float | None) -> list[str]:
        """Block until the next run is due; returns its run-config overrides."""
        while True:
            if self.run_now.exists():
                self.run_now.unlink()
                log.info("run requested (run-now)")
                return ["min-new-episodes=0"]
            if last_start is None or time.monotonic() - last_start >= self.every:
                return [f"min-new-episodes={self.min_new_episodes}"]
            time.sleep(TRIGGER_POLL_S)  # a SIGTERM interrupts it (Stopped)


def serve(
    settings: SuperLinkSettings,
    app: Path,
    run_config: list[str],
    register: list[Path],
    restarts: int,
    schedule: Schedule | None = None,
) -> int:
    """One run to its end (`schedule` None: exit 0 if it completed), or runs for as long as the
    service lives, each started when `schedule` says."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    superlink = SuperLink(settings)

    def on_signal(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        joinable = bring_up(superlink, register)
        notify_ready(joinable)
        if schedule is None:
            status = run_to_end(superlink, app, run_config, register, restarts)
            return 0 if status == "finished:completed" else 1
        from coordinator.registry import prune_runs  # lerobot and torch: see main's `status`

        last_start = None
        while True:
            overrides = schedule.wait(last_start)
            last_start = time.monotonic()
            status = run_to_end(superlink, app, [*run_config, *overrides], register, restarts)
            notify_status(f"last run: {status}; {joinable}")
            if deleted := prune_runs(schedule.output_dir, schedule.keep_runs):
                log.info("deleted %d old runs (--keep-runs %d): %s", len(deleted), schedule.keep_runs, deleted)
    except Stopped as why:
        log.info("stopping (%s)", why)
        return 0
    except GaveUp as why:
        log.error("%s", why)
        return 1
    finally:
        notify_stopping()
        superlink.stop()


class GaveUp(Exception):
    """The SuperLink died more often than allowed."""


def bring_up(superlink: SuperLink, register: list[Path]) -> str:
    superlink.start()
    superlink.register_robots(register)
    superlink.stop_stale_runs()
    log.info("ready: robots can join at %s", superlink.settings.address)
    return f"robots can join at {superlink.settings.address}"


def run_to_end(superlink: SuperLink, app: Path, run_config: list[str], register: list[Path], restarts: int) -> str:
    """Submit a run and follow it to its end; if the SuperLink dies meanwhile, start it again and
    submit the run again (it resumes from its last global model), up to `restarts` times."""
    for attempt in range(restarts + 1):
        status = submit_and_stream(superlink, app, run_config)
        if status is not None:
            log.info("run ended: %s", status)
            notify_status(f"run ended: {status}")
            return status
        if attempt == restarts:
            break
        log.warning(
            "the SuperLink stopped during the run (exit %s); restart %d of %d, the run resumes "
            "from its last global model",
            superlink.process.returncode,
            attempt + 1,
            restarts,
        )
        superlink.stop()
        joinable = bring_up(superlink, register)
        notify_status(f"SuperLink restarted ({attempt + 1} of {restarts}); {joinable}")
    raise GaveUp(f"giving up after {restarts} SuperLink restarts")


def robot_keys(keys: list[Path], key_dirs: list[Path]) -> list[Path]:
    """The keys given one by one and every *.pub file in the directories; refuses any that is missing."""
    missing = [str(k) for k in keys if not k.is_file()] + [str(d) for d in key_dirs if not d.is_dir()]
    if missing:
        raise ValueError(f"robot public keys not found: {missing}")
    return [*keys, *(key for d in key_dirs for key in sorted(d.glob("*.pub")) if key.is_file())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbot-coordinator", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="SuperLink database, its log and the flwr connection (FLWR_HOME=<state-dir>/flwr-home)",
    )
    common.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    common.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and ServerAppIo APIs)")
    common.add_argument("--tls", type=Path, metavar="DIR", help="serve TLS with DIR/ca.crt, server.pem, server.key")
    common.add_argument("--auth", action="store_true", help="only registered robots may join (needs --tls)")
    common.add_argument(
        "--register",
        type=Path,
        nargs="*",
        default=[],
        metavar="KEY.pub",
        help="robot public keys to register before the run",
    )
    common.add_argument(
        "--register-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="register every DIR/*.pub too (repeatable; e.g. /etc/fedbot/robots for systemd)",
    )
    common.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs"),
        help="where runs, global models and metrics go (run-config output-dir)",
    )
    common.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'k=v ...'",
        help="run-config overrides, as for `flwr run` (keys of pyproject [tool.flwr.app.config])",
    )
    common.add_argument("--app", type=Path, default=PROJECT, help="the Flower app to run (default: this repository)")
    common.add_argument("--restarts", type=int, default=3, help="SuperLink restarts per run before giving up")
    common.add_argument(
        "--log-max-mb", type=float, default=10.0, metavar="MB", help="rotate <state-dir>/superlink.log at this size"
    )
    common.add_argument("--log-backups", type=int, default=5, metavar="N", help="rotated SuperLink logs kept")
    commands.add_parser(
        "run", parents=[common], help="start the SuperLink, submit one federated run, stream its log, exit"
    )
    service = commands.add_parser(
        "serve",
        parents=[common],
        help="the service: start the SuperLink and keep starting runs (on a schedule, when robots recorded "
        "enough new episodes, or on run-now), each from the fleet's latest model",
    )
    service.add_argument(
        "--every", type=float, default=3600.0, metavar="S", help="seconds from one scheduled run's start to the next"
    )
    service.add_argument(
        "--min-new-episodes",
        type=int,
        default=10,
        metavar="N",
        help="a scheduled run trains only if the robots recorded N episodes since the fleet's model; "
        "otherwise it only sends that model to robots that lack it",
    )
    service.add_argument(
        "--keep-runs",
        type=int,
        default=50,
        metavar="N",
        help="after each run, delete the runs older than the newest N, except unfinished ones and the one "
        "holding the fleet's model",
    )
    status = commands.add_parser("status", help="the robots the runs have seen: data, models, last contact")
    status.add_argument("--output-dir", type=Path, default=Path("outputs"), help="the coordinator's --output-dir")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    run_now = commands.add_parser("run-now", help="ask the service (serve) for a run at once, whatever the new data")
    run_now.add_argument("--state-dir", type=Path, required=True, help="the service's --state-dir")

    creds = commands.add_parser(
        "credentials", help="create the lab CA and the SuperLink certificate (robots make their own keys)"
    )
    creds.add_argument("--out", type=Path, required=True)
    creds.add_argument(
        "--host", action="append", required=True, help="a name or IP robots use to reach the SuperLink (repeatable)"
    )

    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.command == "credentials":
            print(f"SuperLink certificate: {make_server_certificate(args.out, args.host)}")
            return 0
        if args.command == "status":
            # Reading runs imports lerobot and torch (~6 s on 2 cores): only the commands that read
            # them pay for it, so a `run` with settings that cannot work is refused at once.
            from coordinator.fleet_status import fleet_status, print_status

            fleet = fleet_status(args.output_dir)
            if args.json:
                print(json.dumps(fleet, indent=2))
            else:
                print_status(fleet)
            return 0
        if args.command == "run-now":
            if not args.state_dir.is_dir():
                raise ValueError(f"{args.state_dir} is not a coordinator's state directory")
            write_bytes_atomic(args.state_dir / RUN_NOW, b"")
            print(f"run requested: the service in {args.state_dir} starts it when the current run (if any) ends")
            return 0
        try:
            log_rotation = LogRotation(args.log_max_mb, args.log_backups)
        except ValueError as error:
            raise ValueError(f"--log-max-mb / --log-backups: {error}") from None
        settings = SuperLinkSettings(
            state_dir=args.state_dir.resolve(),
            host=args.host,
            port=args.port,
            tls_dir=args.tls,
            auth=args.auth,
            log_rotation=log_rotation,
        )
        register = robot_keys(args.register, args.register_dir)
        run_config = [f"output-dir='{args.output_dir.resolve()}'", *args.run_config]
        schedule = None
        if args.command == "serve":
            if not 0 < args.every <= 30 * 24 * 3600 or not 0 <= args.min_new_episodes <= 1_000_000:
                raise ValueError("--every must lie in (0, 30 days] and --min-new-episodes in [0, 1000000]")
            if not 1 <= args.keep_runs <= 100_000:
                raise ValueError(f"--keep-runs must lie in [1, 100000], got {args.keep_runs}")
            schedule = Schedule(
                every=args.every,
                min_new_episodes=args.min_new_episodes,
                run_now=settings.state_dir / RUN_NOW,
                output_dir=args.output_dir.resolve(),
                keep_runs=args.keep_runs,
            )
        return serve(settings, args.app.resolve(), run_config, register, args.restarts, schedule)
    except (ValueError, RuntimeError, TimeoutError, OSError) as error:
        print(f"fedbot-coordinator: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
