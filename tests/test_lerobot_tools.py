"""lerobot's own tools accept fedbot's data and checkpoints: `lerobot-train` and `lerobot-eval`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
from lerobot.common.train_utils import load_training_step
from lerobot.utils.constants import PRETRAINED_MODEL_DIR, TRAINING_STATE_DIR

from fedbot.policy_io import load_policy
from fedbot.scenes import EVAL_SEED_START
from hardware.pusht_sim import PushTSim, PushTSimConfig

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
    checkpoint = out / "checkpoints" / "000002"
    assert load_training_step(checkpoint / TRAINING_STATE_DIR) == 2
    # fedbot loads what lerobot trained, and lerobot trained fedbot's weights: two warmup steps (learning
    # rates 0 and 2e-7) moved them by about 2e-7, where another initialisation differs by ~1
    trained = load_policy(checkpoint / PRETRAINED_MODEL_DIR, "cpu").policy.state_dict()
    start = load_policy(untrained_policy, "cpu").policy.state_dict()
    assert sorted(trained) == sorted(start)
    moved = max((trained[key] - start[key]).abs().max().item() for key in start)
    assert 0.0 < moved < 1e-4, moved


def test_lerobot_eval_runs_a_fedbot_checkpoint_on_fedbots_held_out_scenes(untrained_policy, tmp_path):
    """lerobot-eval's --seed=S runs the scenes fedbot's evaluation draws from seeds S, S+1, ... (the
    first frame of each rollout video is that scene), for the episodes and steps asked."""
    out = tmp_path / "lerobot-eval"
    episodes, steps = 2, 30
    result = run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={untrained_policy}",
            "--policy.device=cpu",
            "--env.type=pusht",
            "--env.obs_type=environment_state_agent_pos",
            f"--env.episode_length={steps}",
            f"--eval.n_episodes={episodes}",
            f"--eval.batch_size={episodes}",
            "--eval.use_async_envs=false",
            f"--seed={EVAL_SEED_START}",
            f"--output_dir={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == episodes
    videos = [out / "videos" / "pusht_0" / f"eval_episode_{i}.mp4" for i in range(episodes)]
    assert info["overall"]["video_paths"] == [str(video) for video in videos]

    robot = PushTSim(PushTSimConfig(id="scenes", render_size=384))  # lerobot's pusht renders 384 x 384
    robot.connect()
    try:
        scenes = []
        for seed in range(EVAL_SEED_START, EVAL_SEED_START + episodes):
            robot.reset(seed)
            scenes.append(robot.render().astype(np.float32))
    finally:
        robot.disconnect()
    for i, video in enumerate(videos):
        with av.open(str(video)) as container:
            frames = [frame.to_ndarray(format="rgb24").astype(np.float32) for frame in container.decode(video=0)]
        assert len(frames) == steps  # the episode ran to its step limit (an untrained policy does not succeed)
        # video compression leaves ~0.3 of 255 on average; another scene differs by ~5
        differences = [np.abs(frames[0] - scene).mean() for scene in scenes]
        assert differences[i] < 1.0 and all(d > 2.0 for j, d in enumerate(differences) if j != i), differences
