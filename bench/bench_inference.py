"""Action-chunk inference latency per preset on one CPU core, with lerobot and PyTorch as they are
("torch") and with fedbot's CPU inference path ("fedbot", fedbot/cpu_inference.py).

    .venv/bin/python bench/bench_inference.py [--repeats 20] [--presets pusht-state] [--set kernel_size=3 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import machine, preset_features, preset_with  # noqa: E402
from fedbot.cpu_inference import prepare_for_inference  # noqa: E402
from fedbot.presets import PRESETS  # noqa: E402


def chunk_times(policy: DiffusionPolicy, observation: dict, repeats: int) -> list[float]:
    """Milliseconds per generated action chunk, after one warm-up chunk."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            policy.reset()  # empty action queue: the next select_action generates a chunk
            start = time.perf_counter()
            policy.select_action(observation)
            if i:
                times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="change preset fields for a trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"action-chunk latency, 1 thread, {machine()}")
    for column in ("preset", "inference path", "params", "denoising steps", "median ms", "p90 ms", "ms per action"):
        table.add_column(column, justify="right")
    for name in args.presets:
        config = preset_with(name, args.set).make_config(preset_features(name), device="cpu")
        policy = DiffusionPolicy(config).eval()
        observation = {key: torch.rand(1, *feature.shape) for key, feature in config.input_features.items()}
        repeats = args.repeats if name == "pusht-state" else max(3, args.repeats // 5)
        for path in ("torch", "fedbot"):
            if path == "fedbot":
                prepare_for_inference(policy)
            times = chunk_times(policy, observation, repeats)
            median = statistics.median(times)
            table.add_row(
                " ".join([name, *args.set]),
                path,
                f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M",
                str(config.num_inference_steps),
                f"{median:.0f}",
                f"{statistics.quantiles(times, n=10)[-1]:.0f}",
                f"{median / config.n_action_steps:.1f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
