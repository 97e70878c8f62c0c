"""`fedbot-coordinator`: the lab server's service around the federation.

    fedbot-coordinator run --state-dir DIR [--tls DIR [--auth --register KEY.pub ... --register-dir DIR]]
                           [--run-config "k=v ..."]
    fedbot-coordinator credentials --out DIR --host HOST [--host HOST ...]

`run` starts and supervises a real `flower-superlink`, registers robots' keys, submits the Flower app
in this repository (`flwr run`) and streams its log. If the SuperLink dies, it is started again and
the run is submitted again: the ServerApp continues from its last saved global model and round
(coordinator/registry.py). The same happens when the whole coordinator is restarted (systemd).

Under systemd it is a `Type=notify` service (deploy/systemd/fedbot-coordinator.service): READY=1 once
robots can join, STATUS= on restarts and at the end of the run, STOPPING=1 on shutdown.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from coordinator.credentials import make_server_certificate
from coordinator.superlink import CONNECTION, SuperLink, SuperLinkSettings
from fedbot.flower_processes import BIN, PROJECT
from fedbot.service import (
    configure_logging,
    notify_ready,
    notify_status,
    notify_stopping,
)

log = logging.getLogger("fedbot.coordinator")

RUN_ID = re.compile(r"Successfully started run (\d+)")


class Stopped(Exception):
    """SIGTERM or SIGINT: shut down cleanly."""


def submit_and_stream(superlink: SuperLink, app: Path, run_config: list[str]) -> str | None:
    """`flwr run --stream`, its output copied to ours; returns the run's final status (None if lost).

    If the SuperLink dies meanwhile, the stream is cut so that the supervisor can restart it.
    """
    command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream"]
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


def serve(settings: SuperLinkSettings, app: Path, run_config: list[str], register: list[Path], restarts: int) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    superlink = SuperLink(settings)

    def on_signal(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for attempt in range(restarts + 1):
            superlink.start()
            superlink.register_robots(register)
            superlink.stop_stale_runs()
            log.info("ready: robots can join at %s", settings.address)
            joinable = f"robots can join at {settings.address}"
            if attempt == 0:
                notify_ready(joinable)
            else:
                notify_status(f"SuperLink restarted ({attempt} of {restarts}); {joinable}")
            status = submit_and_stream(superlink, app, run_config)
            if status is not None:
                log.info("run ended: %s", status)
                notify_status(f"run ended: {status}")
                return 0 if status == "finished:completed" else 1
            log.warning(
                "the SuperLink stopped during the run (exit %s); restart %d of %d, the run resumes "
                "from its last global model",
                superlink.process.returncode,
                attempt + 1,
                restarts,
            )
            superlink.stop()
        log.error("giving up after %d SuperLink restarts", restarts)
        return 1
    except Stopped as why:
        log.info("stopping (%s)", why)
        return 0
    finally:
        notify_stopping()
        superlink.stop()


def robot_keys(keys: list[Path], key_dirs: list[Path]) -> list[Path]:
    """The keys given one by one and every *.pub file in the directories; refuses any that is missing."""
    missing = [str(k) for k in keys if not k.is_file()] + [str(d) for d in key_dirs if not d.is_dir()]
    if missing:
        raise ValueError(f"robot public keys not found: {missing}")
    return [*keys, *(key for d in key_dirs for key in sorted(d.glob("*.pub")) if key.is_file())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbot-coordinator", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the SuperLink, submit the federated run, stream its log")
    run.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="SuperLink database, its log and the flwr connection (FLWR_HOME=<state-dir>/flwr-home)",
    )
    run.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    run.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and ServerAppIo APIs)")
    run.add_argument("--tls", type=Path, metavar="DIR", help="serve TLS with DIR/ca.crt, server.pem, server.key")
    run.add_argument("--auth", action="store_true", help="only registered robots may join (needs --tls)")
    run.add_argument(
        "--register",
        type=Path,
        nargs="*",
        default=[],
        metavar="KEY.pub",
        help="robot public keys to register before the run",
    )
    run.add_argument(
        "--register-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="register every DIR/*.pub too (repeatable; e.g. /etc/fedbot/robots for systemd)",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs"),
        help="where runs, global models and metrics go (run-config output-dir)",
    )
    run.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'k=v ...'",
        help="run-config overrides, as for `flwr run` (keys of pyproject [tool.flwr.app.config])",
    )
    run.add_argument("--app", type=Path, default=PROJECT, help="the Flower app to run (default: this repository)")
    run.add_argument("--restarts", type=int, default=3, help="SuperLink restarts before giving up")

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
        settings = SuperLinkSettings(
            state_dir=args.state_dir.resolve(), host=args.host, port=args.port, tls_dir=args.tls, auth=args.auth
        )
        register = robot_keys(args.register, args.register_dir)
        run_config = [f"output-dir='{args.output_dir.resolve()}'", *args.run_config]
        return serve(settings, args.app.resolve(), run_config, register, args.restarts)
    except (ValueError, RuntimeError, TimeoutError, OSError) as error:
        print(f"fedbot-coordinator: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
