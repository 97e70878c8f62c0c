"""Policy presets pin the configuration fedbot depends on."""

import pytest
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

from fedbot.presets import PRESETS, get_preset
from fedbot.recording import dataset_features
from hardware.pusht_sim import PushTSim, PushTSimConfig

FEATURES = dataset_features(PushTSim(PushTSimConfig(id="t")))


def test_image_preset_is_the_flower_example_configuration():
    config = get_preset("pusht-image").make_config(FEATURES, device="cpu")
    assert list(config.input_features) == ["observation.image", "observation.state"]
    assert config.down_dims == (256, 512, 1024)
    assert (config.horizon, config.n_action_steps, config.n_obs_steps) == (16, 8, 2)
    assert config.crop_shape == (84, 84) and config.use_group_norm
    assert config.pretrained_backbone_weights is None


def test_state_preset_uses_no_image_and_ddim():
    config = get_preset("pusht-state").make_config(FEATURES, device="cpu")
    assert list(config.input_features) == ["observation.state", "observation.environment_state"]
    assert config.noise_scheduler_type == "DDIM" and config.num_inference_steps == 10
    assert config.down_dims == (64, 128, 256)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_offline(name):
    policy = DiffusionPolicy(get_preset(name).make_config(FEATURES, device="cpu"))
    assert sum(p.numel() for p in policy.parameters()) > 1_000_000


def test_unknown_preset_and_missing_features_are_clear_errors():
    with pytest.raises(ValueError, match="known presets"):
        get_preset("pusht-lidar")
    without_env_state = {k: v for k, v in FEATURES.items() if k != "observation.environment_state"}
    with pytest.raises(ValueError, match="observation.environment_state"):
        get_preset("pusht-state").make_config(without_env_state)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_input_and_the_action_are_normalized(name, small_dataset):
    """lerobot's default mapping has no entry for ENV features: they would reach the net in pixels."""
    import torch

    from fedbot.training import InMemoryFrames, new_policy, open_dataset

    dataset = open_dataset(small_dataset)
    loaded = new_policy(get_preset(name), dataset, device="cpu")
    batch = loaded.preprocessor(InMemoryFrames(dataset, loaded.policy.config).batch(32, torch.Generator()))
    for key in [*loaded.policy.config.input_features, "action"]:
        if key != "observation.image":  # images are mean/std normalized, not bounded
            assert batch[key].abs().max() <= 1.0 + 1e-5, key
