"""The `fedbot` command line, run as real processes: record -> train -> eval, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lerobot.datasets.lerobot_dataset import LeRobotDataset

FEDBOT = [sys.executable, "-m", "fedbot.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SVT_LOG": "1"}


def fedbot(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDBOT, *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1], env=ENV)


def test_record_train_eval(tmp_path):
    root, run, out = tmp_path / "robot0", tmp_path / "run", tmp_path / "eval"
    rec = fedbot("record", "--sim", "--root", root, "--episodes", 2, "--style", "default", cwd=tmp_path)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    dataset = LeRobotDataset("fedbot/robot0", root=root)
    assert dataset.meta.total_episodes == 2  # the expert succeeds on these seeds

    tr = fedbot("train", "--dataset", root, "--preset", "pusht-state", "--steps", 2, "--out", run, cwd=tmp_path)
    assert tr.returncode == 0, tr.stdout + tr.stderr
    policy = run / "checkpoints" / "last" / "pretrained_model"
    assert (policy / "model.safetensors").is_file()

    ev = fedbot("eval", "--policy", policy, "--episodes", 1, "--videos", 0, "--out", out, cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert "success rate" in ev.stdout
    assert json.loads((out / "eval.json").read_text())["episodes"][0]["seed"] == 100_000


def test_bad_input_is_a_clear_error(tmp_path):
    missing = fedbot("train", "--dataset", tmp_path / "nowhere", "--steps", 1, "--out", tmp_path / "r", cwd=tmp_path)
    assert missing.returncode == 2 and "holds no LeRobot dataset" in missing.stderr
    seeds = fedbot("record", "--sim", "--root", tmp_path / "d", "--episodes", 2, "--seed", 99_999, cwd=tmp_path)
    assert seeds.returncode == 2 and "held out" in seeds.stderr
    style = fedbot("record", "--sim", "--root", tmp_path / "d", "--episodes", 1, "--style", "sideways", cwd=tmp_path)
    assert style.returncode == 2 and "invalid choice" in style.stderr
    assert not (tmp_path / "d" / "meta" / "info.json").exists()
