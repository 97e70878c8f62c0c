"""lerobot's own tools accept fedbot's data and checkpoints: `lerobot-train` and `lerobot-eval`."""

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_lerobot_train_trains_on_a_recorded_dataset(small_dataset, untrained_policy, tmp_path):
    out = tmp_path / "lerobot-train"
    result = run(
        [
            str(BIN / "lerobot-train"),
            f"--dataset.repo_id=fedbot/{small_dataset.name}",
            f"--dataset.root={small_dataset}",
            f"--policy.path={untrained_policy}",
            "--policy.push_to_hub=false",
            "--policy.device=cpu",
            "--steps=2",
            "--batch_size=4",
            f"--output_dir={out}",
            "--wandb.enable=false",
            "--save_freq=2",
            "--log_freq=1",
            "--num_workers=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "000002" / "pretrained_model" / "model.safetensors").is_file()


def test_lerobot_eval_accepts_a_fedbot_checkpoint(untrained_policy, tmp_path):
    out = tmp_path / "lerobot-eval"
    result = run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={untrained_policy}",
            "--policy.device=cpu",
            "--env.type=pusht",
            "--env.obs_type=environment_state_agent_pos",
            "--env.episode_length=30",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            f"--output_dir={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert 0.0 <= info["overall"]["pc_success"] <= 100.0
