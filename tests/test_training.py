"""Local training: batches equal to lerobot's, checkpoints in lerobot's format, resume."""

import json

import pytest
import torch
from lerobot.common.train_utils import load_training_step
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors

from fedbot.presets import get_preset
from fedbot.training import (
    InMemoryFrames,
    TrainState,
    last_checkpoint,
    new_policy,
    open_dataset,
    train,
)


@pytest.mark.parametrize("preset", ["pusht-state", "pusht-image"])
def test_in_memory_batches_equal_lerobot_samples(small_dataset, preset):
    dataset = open_dataset(small_dataset)
    config = get_preset(preset).make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    reference = LeRobotDataset(
        dataset.repo_id, root=small_dataset, delta_timestamps=resolve_delta_timestamps(config, dataset.meta)
    )
    # indices at episode starts and ends exercise the padding
    for index in [0, 1, 20, 39, 40, 41, 79, 119]:
        frames.sample_indices = torch.tensor([index])
        batch = frames.batch(1, torch.Generator())
        item = reference[index]
        for key in [*config.input_features, "action"]:
            assert torch.allclose(batch[key][0], item[key], atol=1e-6), (index, key)
            assert torch.equal(batch[f"{key}_is_pad"][0], item[f"{key}_is_pad"]), (index, key)


def test_sampling_skips_the_last_frames_of_each_episode(small_dataset):
    dataset = open_dataset(small_dataset)
    config = get_preset("pusht-state").make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    drop = config.drop_n_last_frames
    expected = [i for ep in range(3) for i in range(ep * 40, ep * 40 + 40 - drop)]
    assert frames.sample_indices.tolist() == expected


def test_checkpoints_resume_and_load_with_lerobot(small_dataset, tmp_path):
    preset = get_preset("pusht-state")
    out = tmp_path / "run"
    train(small_dataset, preset, 4, out, save_every=2, show_progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000004", "last"]
    assert last_checkpoint(out).name == "000004"

    policy_dir = train(small_dataset, preset, 6, out, save_every=2, show_progress=False)
    checkpoint = last_checkpoint(out)
    assert checkpoint.name == "000006"
    assert load_training_step(checkpoint / "training_state") == 6
    run = json.loads((checkpoint / "fedbot_train.json").read_text())
    assert (run["preset"], run["steps"]) == ("pusht-state", 6)

    # lerobot's own loaders, offline
    config = DiffusionConfig.from_pretrained(policy_dir)
    assert config.pretrained_backbone_weights is None
    assert (config.horizon, config.n_action_steps, config.n_obs_steps) == (16, 8, 2)
    policy = DiffusionPolicy.from_pretrained(policy_dir, config=config)
    assert sum(p.numel() for p in policy.parameters()) > 1_000_000
    preprocessor, _ = make_pre_post_processors(config, pretrained_path=str(policy_dir))
    normalizer = next(s for s in preprocessor.steps if hasattr(s, "stats") and s.stats)
    dataset = open_dataset(small_dataset)
    for stat in ("min", "max"):
        assert torch.allclose(
            torch.as_tensor(normalizer.stats["observation.state"][stat]).float(),
            torch.as_tensor(dataset.meta.stats["observation.state"][stat]).float(),
        )


def test_resume_refuses_another_preset(small_dataset, tmp_path):
    train(small_dataset, get_preset("pusht-state"), 1, tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match="preset"):
        train(small_dataset, get_preset("pusht-image"), 2, tmp_path / "run", show_progress=False)


def test_training_reduces_the_loss_on_a_fixed_batch(small_dataset):
    dataset = open_dataset(small_dataset)
    torch.manual_seed(0)
    loaded = new_policy(get_preset("pusht-state"), dataset, device="cpu")
    frames = InMemoryFrames(dataset, loaded.policy.config)
    state = TrainState.create(loaded, total_steps=1000)
    for group in state.optimizer.param_groups:  # a constant rate instead of the warmup, for a short test
        group["lr"] = 1e-3
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda _: 1.0)
    fixed = loaded.preprocessor(frames.batch(64, torch.Generator().manual_seed(1)))

    def fixed_loss() -> float:
        torch.manual_seed(2)  # same noise and timesteps each time
        with torch.no_grad():
            return loaded.policy.forward(fixed)[0].item()

    before = fixed_loss()
    state.train_steps(frames, 80, 32, torch.Generator().manual_seed(3))
    assert fixed_loss() < 0.5 * before
