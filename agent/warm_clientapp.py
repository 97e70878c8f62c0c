"""A robot's SuperNode whose ClientApps start warm.

    python -m agent.warm_clientapp --runtime-api-address 127.0.0.1:9094 -- flower-supernode ARGS...

Flower runs every message a robot receives in a new `flwr-clientapp` process, and each imports
torch, lerobot and gym again: ~15 s of CPU on 2 cores before it trains one step, most of a short
round (BENCHMARKS.md). This process starts the SuperNode in Flower's `process` isolation and takes
the place of its SuperExec: Flower's own SuperExec loop (`run_superexec`), with one change, the
executor. Instead of starting `flwr-clientapp` from scratch, it forks each ClientApp from a fork
server that imported those libraries once. The ClientApp itself runs Flower's `run_clientapp`
unchanged, and loads the ClientApp's code (agent/, fedbot/, ...) from the run's FAB as Flower does:
only third-party libraries are preloaded.

Only the lab's ClientApp code runs: Flower puts the run's FAB first on sys.path and imports the
ClientApp it names, so whoever can submit a run could otherwise run any code on every robot. The
executor launches a ClientApp only for a run whose FAB is, byte for byte, the one Flower builds
from the fedbot installed on this robot (`--app-sha256`, fedbot/flower_processes.py); any other
run's messages are refused and logged, and nothing of that FAB is imported.

It exits with the SuperNode's exit code when the SuperNode exits. It and everything it starts are
in the SuperNode's process group (agent/supernode.py stops them together).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing import forkserver

import flwr.supercore.superexec.run_superexec as flower_superexec
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedbot.process_group import die_with_parent

# What every fedbot ClientApp imports, and which takes the time: imported once, in the fork server.
PRELOAD = [
    "torch",
    "lerobot.datasets.lerobot_dataset",
    "lerobot.policies.diffusion.modeling_diffusion",
    "lerobot.policies.factory",
    "gym_pusht",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
]


class ForkServerExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApps are forked from the warm fork server,
    and only for runs of the installed app (`app_sha256`)."""

    def __init__(self, app_sha256: str):
        self.context = multiprocessing.get_context("forkserver")
        self.app_sha256 = app_sha256

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        if spec.fab_hash != self.app_sha256:
            why = (
                f"refused a ClientApp of a run whose app (FAB sha256 {str(spec.fab_hash)[:16]}...) is not the "
                f"fedbot installed on this robot ({self.app_sha256[:16]}...)"
            )
            print(f"warm_clientapp: {why}", file=sys.stderr, flush=True)
            return LaunchResult.failed(why)
        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
        self.context.Process(
            target=run_clientapp,
            name=f"clientapp-{spec.task_id}",
            kwargs={
                "runtime_api_address": spec.runtime_api_address,
                "token": spec.token,
                "insecure": spec.insecure,
                "certificates": certificates,
                "parent_pid": spec.parent_pid,
                "runtime_dependency_install": spec.runtime_dependency_install,
            },
        ).start()
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        multiprocessing.active_children()  # reaps the ClientApps that have finished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.warm_clientapp", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port)")
    parser.add_argument("--app-sha256", required=True, help="the only app package (FAB) whose ClientApps may run")
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- and the flower-supernode command")
    args = parser.parse_args(argv)
    command = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    supernode = subprocess.Popen([*command, "--isolation", "process"], preexec_fn=die_with_parent)

    def follow_supernode() -> None:
        code = supernode.wait()
        os._exit(code if code >= 0 else 128 - code)  # the SuperNode's code (a signal as the shell reports it)

    threading.Thread(target=follow_supernode, name="supernode", daemon=True).start()
    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # imports now, while the SuperNode connects; not at the first message
    # Flower builds its executor with this factory; fedbot's replaces it (flwr is pinned: pyproject.toml).
    app_sha256 = args.app_sha256
    flower_superexec.get_executor = lambda *_args, **_kwargs: ForkServerExecutor(app_sha256)
    flower_superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True)


if __name__ == "__main__":
    sys.exit(main())
