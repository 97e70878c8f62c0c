"""Evaluation in the simulator: held-out seeds, reproducible episodes, videos and JSON."""

import json

import av
import pytest

from fedbot.evaluation import evaluate
from fedbot.policy_io import load_policy
from fedbot.scenes import EVAL_SEED_START
from hardware.pusht_sim import PushTSim, PushTSimConfig


def test_eval_writes_results_and_videos(untrained_policy, tmp_path):
    loaded = load_policy(untrained_policy, device="cpu")
    report = evaluate(loaded, 2, tmp_path / "eval", videos=1)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [e["seed"] for e in saved["episodes"]] == [EVAL_SEED_START, EVAL_SEED_START + 1]
    assert saved["success_rate"] == sum(e["success"] for e in saved["episodes"]) / 2
    assert saved["mean_max_coverage"] == pytest.approx(sum(e["max_coverage"] for e in saved["episodes"]) / 2)
    # each episode counts its starting scene's coverage, ends at its step limit unless it succeeded,
    # and succeeded exactly when its coverage passed the threshold
    robot = PushTSim(PushTSimConfig(id="scenes"))
    robot.connect()
    try:
        for episode in saved["episodes"]:
            robot.reset(episode["seed"])
            assert robot.episode_status().coverage <= episode["max_coverage"] <= 1.0
            assert episode["success"] == (episode["max_coverage"] > robot.env.success_threshold)
            assert episode["success"] or episode["steps"] == robot.config.max_episode_steps
    finally:
        robot.disconnect()
    videos = sorted(p.name for p in (tmp_path / "eval").glob("*.mp4"))
    assert videos == [f"rollout_{EVAL_SEED_START}.mp4"]
    with av.open(str(tmp_path / "eval" / videos[0])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == report.episodes[0].steps

    # the same seeds give the same episodes
    again = evaluate(loaded, 2)
    assert again.episodes == report.episodes


def test_eval_refuses_a_policy_the_simulator_cannot_run():
    import numpy as np

    from fedbot.presets import get_preset
    from fedbot.training import policy_from_stats

    arm_features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "observation.images.front": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": (6,), "names": None},
    }
    joints = {"min": np.full(6, -90.0), "max": np.full(6, 90.0), "mean": np.zeros(6), "std": np.ones(6)}
    image = {"mean": np.full((3, 1, 1), 0.5), "std": np.full((3, 1, 1), 0.25)}
    arm_policy = policy_from_stats(
        get_preset("so-arm-image"),
        arm_features,
        {"observation.state": joints, "action": joints, "observation.images.front": image},
    )
    with pytest.raises(ValueError, match=r"the PushT simulator cannot run this policy: it needs .*observation.images"):
        evaluate(arm_policy, 1)


def test_eval_refuses_recording_seeds(untrained_policy):
    with pytest.raises(ValueError, match="evaluation seeds"):
        evaluate(load_policy(untrained_policy, device="cpu"), 1, seed_start=10)
