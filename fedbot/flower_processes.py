"""How fedbot starts Flower's processes: where their executables are, the environment each gets,
free ports for several of them on one host, a SuperLink for Flower's simulation engine, and the
app package (FAB) that `flwr run` submits and robots check runs against."""

from __future__ import annotations

import functools
import hashlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedbot.process_group import stop_with_sessions_below

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flower-superexec and flwr beside python
PROJECT = Path(__file__).resolve().parents[1]  # this checkout: the Flower app (pyproject [tool.flwr.app])

# The environment of every Flower process fedbot starts (SuperLink, SuperNode, ClientApps, `flwr`).
FLOWER_ENVIRONMENT = {
    # torch's OpenMP threads spin while they wait. Where a ClientApp or the ServerApp shares the
    # cores (the robot's control loop, another ClientApp, the sim evaluation), spinning threads slow
    # everyone down many times over; passive waiting costs little when the process has the cores.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Flower reports usage events to telemetry.flower.ai by default, and a ClientApp's exit waits up
    # to 4 s for that report. A robot talks to its coordinator only.
    "FLWR_TELEMETRY_ENABLED": "0",
    # How often the SuperNode's SuperExec looks for a message to start a ClientApp for (Flower's
    # default 1 s, a local HTTP call each time).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


@functools.cache
def installed_app_sha256() -> str:
    """The sha256 of the app package (FAB) Flower builds from this checkout: what `flwr run` of the
    installed fedbot submits. Flower's build is deterministic (fixed dates, sorted files), so a
    robot computes it from its own copy and runs no other ClientApp code (agent/warm_clientapp.py)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files(app_files(PROJECT))
    return hashlib.sha256(fab).hexdigest()


def app_files(app: Path) -> dict[str, Path]:
    """The files under `app` that Flower's FAB build may keep ({relative POSIX path: path}), found
    without entering the directories its rules exclude (the app's .gitignore, Flower's publish
    excludes). Flower's own `collect_files` resolves every file under the app, the venv's ~55,000
    included: ~9 s of CPU per build, at every robot's start and every `flwr run`. Flower's build
    filters what this returns as it filters its own list, so the FAB is the same (tests/test_fab.py)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = app.resolve()
    gitignore = root / ".gitignore"
    patterns = tuple(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    # A negated pattern could take back a file of an excluded directory: then walk everything.
    excluded = [] if any(p.startswith("!") for p in patterns) else [build_pathspec(patterns)]
    excluded.append(build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS))
    files = {}
    for directory, subdirectories, names in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = [
            d for d in subdirectories if not any(spec.match_file(f"{(relative / d).as_posix()}/") for spec in excluded)
        ]
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):  # as Flower's collect_files
                files[(relative / name).as_posix()] = path
    return files


def staged_app(into: Path, app: Path = PROJECT) -> Path:
    """`into`, made a copy of the files of the app at `app` that go into its FAB: `flwr run` of the
    copy submits the very FAB of `app` without walking its venv."""
    from flwr.cli.utils import filter_paths_for_publish

    shutil.rmtree(into, ignore_errors=True)
    for relative, path in filter_paths_for_publish(app_files(app)).items():
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, into / relative)
    return into


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """This process's environment plus FLOWER_ENVIRONMENT, a FLWR_HOME of the process's own (so
    the operator's ~/.flwr is never touched) and BIN first on PATH (Flower starts its helpers by name)."""
    path = f"{BIN}:{os.environ.get('PATH', '')}"
    return {**os.environ, **FLOWER_ENVIRONMENT, "FLWR_HOME": str(flwr_home), "PATH": path}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once something accepts connections on 127.0.0.1:`port` (connect attempts, not sleeps);
    fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            select.select([], [], [], 0.2)  # back off before the next connection attempt
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@contextmanager
def simulation_superlink(home: Path) -> Iterator[dict[str, str]]:
    """A `flower-superlink --simulation` on a free port, with FLWR_HOME `home` whose default connection
    `sim` is it; yields the environment for `flwr run . sim` and stops the SuperLink afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_environment(home)
    command = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--disable-runtime-dependency-installation",
        "--port",
        str(port),
    ]
    with open(home / "superlink.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_port(port, process)
        yield env
    finally:
        # Flower's simulation and Ray's processes run in sessions of their own: a SuperLink stopped
        # mid-run would leave them training (a paused fleet bench's robots trained on for an hour).
        stop_with_sessions_below(process, timeout=60)


def simulation_run(run_config: str, robots: int, cpus_per_robot: int, stage: Path) -> list[str]:
    """`flwr run` of this app (staged in `stage`) on the `sim` connection of a `simulation_superlink`,
    streaming its log: `robots` virtual SuperNodes, each ClientApp given `cpus_per_robot` cores."""
    federation = f"num-supernodes={robots} client-resources-num-cpus={cpus_per_robot}"
    return [
        str(BIN / "flwr"),
        "run",
        str(staged_app(stage)),
        "sim",
        "--stream",
        "--run-config",
        run_config,
        "--federation-config",
        federation,
    ]
