"""Bytes one robot sends per round: the seed's fp32 full state dict versus fedbot's transfer.

The Flower quickstart-lerobot example ships every state-dict entry (parameters and buffers) in fp32.
fedbot ships trainable parameters only, as one vector in the run's `weights-dtype`. Sizes are Flower's own
`ArrayRecord.count_bytes()` (serialized arrays plus keys), per preset.

    .venv/bin/python bench/bench_transfer.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord  # noqa: E402
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import machine, preset_features  # noqa: E402
from fedbot.presets import PRESETS  # noqa: E402
from fedbot.transfer import weights_to_record  # noqa: E402


def main() -> None:
    table = Table(title=f"bytes per robot per round (one direction), {machine()}")
    for column in ("preset", "seed: fp32 state dict", "fedbot float32", "fedbot float16", "float16 / seed"):
        table.add_column(column, justify="right")
    for name, preset in PRESETS.items():
        policy = DiffusionPolicy(preset.make_config(preset_features(name), device="cpu"))
        seed = ArrayRecord(policy.state_dict()).count_bytes()
        fp32 = weights_to_record(policy, "float32").count_bytes()
        fp16 = weights_to_record(policy, "float16").count_bytes()
        table.add_row(
            name, f"{seed / 1e6:.2f} MB", f"{fp32 / 1e6:.2f} MB", f"{fp16 / 1e6:.2f} MB", f"{fp16 / seed:.3f}"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
