"""Peak memory of training on a camera dataset, the case a robot's RAM must hold.

An SO arm's dataset (6 joints, one 640x480 camera, 30 fps) of `--episodes` episodes of `--seconds`
is written once under `--work` with lerobot (`LeRobotDataset.create`, `add_frame`, `save_episode`,
its AV1 encoder); the camera films a synthetic scene (a gradient with a moving square). Then, in a
fresh process each, the so-arm-image preset's training path (`fedbot.training`: `open_dataset`,
`InMemoryFrames`, `--steps` optimizer steps at the preset's batch size) runs and its peak resident
memory (the kernel's VmHWM) is read. Prints a table; the target is at most 4 GiB.

    python bench/bench_camera_memory.py [--episodes 50] [--seconds 20] [--steps 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, preset_features  # noqa: E402

FPS = 30
CAMERA = "observation.images.front"
GIB = 2**30


def write_dataset(root: Path, episodes: int, seconds: float) -> None:
    """The synthetic arm dataset at `root`, unless a complete one is there."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if (root / "meta" / "info.json").exists():
        return
    dataset = LeRobotDataset.create(
        "fedbot/camera-memory", fps=FPS, features=preset_features("so-arm-image"), root=root, use_videos=True
    )
    height, width, _ = dataset.meta.features[CAMERA]["shape"]
    background = np.linspace(0, 160, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        for t in range(int(seconds * FPS)):
            frame = background.copy()
            x, y = (37 * t) % (width - 80), (23 * t) % (height - 80)
            frame[y : y + 80, x : x + 80] = (220, 60, 40)
            joints = rng.uniform(-1, 1, 6).astype(np.float32)
            dataset.add_frame({"observation.state": joints, CAMERA: frame, "action": joints, "task": "move"})
        dataset.save_episode()
    dataset.finalize()


def train_peak(root: Path, steps: int) -> dict:
    """Load `root` for training and run `steps` steps in this process; its peak RSS and timings."""
    import torch

    from fedbot.presets import get_preset
    from fedbot.training import InMemoryFrames, TrainState, new_policy, open_dataset

    start = time.perf_counter()
    dataset = open_dataset(root)
    preset = get_preset("so-arm-image")
    loaded = new_policy(preset, dataset, device="cpu")
    frames = InMemoryFrames(dataset, loaded.policy.config)
    loaded_s, loaded_peak = time.perf_counter() - start, peak_rss_gib()
    state = TrainState.create(loaded, steps)
    start = time.perf_counter()
    state.train_steps(frames, steps, preset.batch_size, torch.Generator().manual_seed(0))
    return {
        "frames": frames.num_frames,
        "held": tuple(frames.tensors[CAMERA].shape[-2:]),
        "held_gib": frames.tensors[CAMERA].numel() / GIB,
        "load_s": loaded_s,
        "step_s": (time.perf_counter() - start) / steps,
        "load_peak_gib": loaded_peak,
        "peak_gib": peak_rss_gib(),
    }


def peak_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024 / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedbot-camera-memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.work / f"arm-{args.episodes}x{args.seconds:g}s"
    if args.child:
        print(json.dumps(train_peak(root, args.steps)))
        return
    start = time.perf_counter()
    write_dataset(root, args.episodes, args.seconds)
    print(f"dataset: {root} ({time.perf_counter() - start:.0f} s to write or find)")
    child = [sys.executable, __file__, "--child", "--episodes", str(args.episodes), "--seconds", str(args.seconds)]
    child += ["--steps", str(args.steps), "--work", str(args.work)]
    out = subprocess.run(child, check=True, text=True, stdout=subprocess.PIPE).stdout
    result = json.loads(out.strip().splitlines()[-1])
    recorded = result["frames"] * 480 * 640 * 3 / GIB
    print(f"machine: {machine()}")
    height, width = result["held"]
    table = {
        "frames": result["frames"],
        "camera": "640x480",
        "held at": f"{width}x{height}",
        "at camera size": f"{recorded:.1f} GiB",
        "held": f"{result['held_gib']:.2f} GiB",
        "load": f"{result['load_s']:.0f} s",
        "peak RSS loaded": f"{result['load_peak_gib']:.2f} GiB",
        "step": f"{result['step_s']:.1f} s",
        "peak RSS": f"{result['peak_gib']:.2f} GiB",
    }
    print("| " + " | ".join(table) + " |")
    print("|" + "---|" * len(table))
    print("| " + " | ".join(map(str, table.values())) + " |")


if __name__ == "__main__":
    main()
