"""Policy presets pin the configuration fedbot depends on."""

import pytest
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

from fedbot.presets import PRESETS, get_preset
from fedbot.recording import dataset_features
from hardware.pusht_sim import PushTSim, PushTSimConfig

FEATURES = dataset_features(PushTSim(PushTSimConfig(id="t")))
VIDEO = ["height", "width", "channels"]
ARM_FEATURES = {  # an SO arm with two cameras (hardware/so_arm.py); lerobot wants one image shape
    "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
    "observation.images.front": {"dtype": "video", "shape": (480, 640, 3), "names": VIDEO},
    "observation.images.wrist": {"dtype": "video", "shape": (480, 640, 3), "names": VIDEO},
    "action": {"dtype": "float32", "shape": (6,), "names": None},
}
PUSHT_PRESETS = sorted(name for name in PRESETS if name.startswith("pusht"))


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
    features = ARM_FEATURES if name.startswith("so-arm") else FEATURES
    policy = DiffusionPolicy(get_preset(name).make_config(features, device="cpu"))
    assert sum(p.numel() for p in policy.parameters()) > 1_000_000


def test_unknown_preset_and_missing_features_are_clear_errors():
    with pytest.raises(ValueError, match="known presets"):
        get_preset("pusht-lidar")
    without_env_state = {k: v for k, v in FEATURES.items() if k != "observation.environment_state"}
    with pytest.raises(ValueError, match="observation.environment_state"):
        get_preset("pusht-state").make_config(without_env_state)


def test_arm_preset_takes_the_joints_and_every_camera():
    config = get_preset("so-arm-image").make_config(ARM_FEATURES, device="cpu")
    assert list(config.input_features) == ["observation.state", "observation.images.front", "observation.images.wrist"]
    assert config.resize_shape == (96, 128) and config.crop_shape == (84, 112)
    with pytest.raises(ValueError, match=r"observation.images.\*"):  # an arm without a camera
        get_preset("so-arm-image").make_config(
            {k: v for k, v in ARM_FEATURES.items() if "images" not in k}, device="cpu"
        )


# On PushT data; the arm preset normalizes and trains on arm data in test_agent_arm.py.
@pytest.mark.parametrize("name", PUSHT_PRESETS)
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
