"""Hot-swaps under load: N models delivered to the inbox while the live policy runs at 30 Hz.

    .venv/bin/python bench/bench_swap.py [--swaps 100] [--rate 30]

An in-process agent (the real inbox watcher, checks, store and control loop) drives the PushT sim
robot with the pusht-state preset. Each model is written with the deploy path the ClientApp uses
(agent/inbox.py: write, fsync, rename) into a staging directory first; each swap is one
rename into the inbox, and the benchmark waits until the model is live. Reported: missed
ticks, tick jitter, starved ticks, swap latency (inbox event -> first action computed by the new
weights), process RSS before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.config import AgentConfig, ChecksSection, ControlSection, CoordinatorSection  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.inbox import write_to_inbox  # noqa: E402
from bench.common import expert_dataset, machine  # noqa: E402
from fedbot.model_manifest import generate_key, load_private_key, sign_model_dir  # noqa: E402
from fedbot.policy_io import load_policy, save_policy  # noqa: E402
from fedbot.presets import get_preset  # noqa: E402
from fedbot.training import train  # noqa: E402


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stage(staging: Path, reference: Path, key, round_number: int) -> Path:
    """A model signed as the coordinator signs it and written the way the ClientApp's deploy writes
    it (before the clock runs)."""
    signed = staging / f"signed-{round_number}"
    shutil.copytree(reference, signed)
    sign_model_dir(signed, key, {"round": round_number, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    files = {path.name: path.read_bytes() for path in signed.iterdir()}
    shutil.rmtree(signed)
    return write_to_inbox(staging, round_number, files)


def deliver(agent: Agent, staged: Path) -> str:
    """The model lands: one rename into the inbox, as at the end of the deploy's write."""
    os.rename(staged, agent.models.inbox / staged.name)
    return staged.name


def wait_live(agent: Agent, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while agent.updates.last_swap is None or agent.updates.last_swap["model"] != name:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not live after {timeout} s; rejected: {agent.models.rejections()[:1]}")
        time.sleep(0.01)  # poll: the benchmark, not the agent, waits here
    return agent.updates.last_swap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1, help="control.inference-threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    dataset = expert_dataset(work / "demos", 2)
    policy_dir = train(dataset, get_preset("pusht-state"), 0, work / "train", show_progress=False)
    save_policy(work / "reference", load_policy(policy_dir, "cpu"))
    public = generate_key(work / "signing.key", "bench")

    config = AgentConfig(
        robot_id="bench",
        data_dir=work / "agent",
        socket=work / "agent.sock",
        coordinator=CoordinatorSection(superlink="127.0.0.1:1"),
        control=ControlSection(rate_hz=args.rate, device="cpu", inference_threads=args.threads),
        checks=ChecksSection(trusted_keys=[public]),
    )
    key = load_private_key(work / "signing.key")
    staged = [stage(work / "staging", work / "reference", key, i) for i in range(args.swaps + 1)]
    agent = Agent(config)
    agent.start()
    try:
        wait_live(agent, deliver(agent, staged[0]))
        agent.run()  # the policy runs on; sim episodes restart as they end
        agent.control.wait_ticks(int(args.rate) * 5, timeout=60)  # settle for 5 s
        control = agent.control
        rss_before, missed_before = rss_mb(), control.missed
        ticks_before, actions_before, starved_before = control.ticks, control.actions, control.inference.starved
        started = time.monotonic()
        latencies = []
        for i in range(1, args.swaps + 1):
            latencies.append(wait_live(agent, deliver(agent, staged[i]))["latency-ms"])
        elapsed = time.monotonic() - started
        timing = agent.control.timing()
        rss_after = rss_mb()
        missed, ticks = control.missed - missed_before, control.ticks - ticks_before
        actions, starved = control.actions - actions_before, control.inference.starved - starved_before
    finally:
        agent.stop()
        agent.close()

    table = Table(
        title=f"{args.swaps} hot-swaps at {args.rate:g} Hz, pusht-state, {args.threads} inference "
        f"thread(s), {machine()}"
    )
    for column in ("measure", "value"):
        table.add_column(column)
    rows = [
        ("ticks during the swaps; actions sent", f"{ticks} in {elapsed:.0f} s; {actions}"),
        ("missed ticks", str(missed)),
        (
            "tick jitter p50 / p99 / max (last 3000 ticks)",
            f"{timing['jitter-ms-p50']:.2f} / {timing['jitter-ms-p99']:.2f} / {timing['jitter-ms-max']:.2f} ms",
        ),
        ("ticks without an action ready (starved); late chunks (whole run)", f"{starved}; {timing['late-chunks']}"),
        ("chunk inference (decaying max)", f"{timing['inference-ms']:.0f} ms"),
        (
            "swap latency p50 / p99 / max",
            f"{statistics.median(latencies):.0f} / {np.percentile(latencies, 99):.0f} / {max(latencies):.0f} ms",
        ),
        ("RSS before / after", f"{rss_before:.0f} / {rss_after:.0f} MB"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
