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


INPUTS = {  # what each preset feeds the policy from its robot's features
    "pusht-image": ["observation.image", "observation.state"],
    "pusht-state": ["observation.state", "observation.environment_state"],
    "so-arm-image": ["observation.state", "observation.images.front", "observation.images.wrist"],
}


def features_for(name: str) -> dict:
    return ARM_FEATURES if name.startswith("so-arm") else FEATURES


def test_every_preset_has_its_inputs_listed_here():
    assert sorted(INPUTS) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_pins_the_chunking_and_takes_its_inputs_from_the_dataset(name):
    preset = get_preset(name)
    features = features_for(name)
    config = preset.make_config(features, device="cpu")
    # The action chunking the controller and the evaluation rely on, whatever lerobot's defaults.
    assert (config.horizon, config.n_action_steps, config.n_obs_steps) == (16, 8, 2)
    assert config.drop_n_last_frames == 7
    assert config.pretrained_backbone_weights is None and config.use_group_norm
    assert config.device == "cpu" and not config.push_to_hub
    # Every pinned field survives DiffusionConfig's own post-processing unchanged.
    assert {key: getattr(config, key) for key in preset.config} == preset.config
    # Inputs and action with the dataset's shapes (images channels-first).
    assert preset.inputs(features) == INPUTS[name]
    assert list(config.input_features) == INPUTS[name]
    for key, feature in config.input_features.items():
        shape = features[key]["shape"]
        assert feature.shape == ((shape[2], shape[0], shape[1]) if features[key]["dtype"] == "video" else shape)
    assert list(config.output_features) == ["action"]
    assert config.output_features["action"].shape == features["action"]["shape"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_without_downloading_weights_and_computes_a_loss(name, monkeypatch):
    import torch
    import torchvision.models._api

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"the preset downloads {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    config = get_preset(name).make_config(features_for(name), device="cpu")
    policy = DiffusionPolicy(config)
    torch.manual_seed(0)
    batch = {key: torch.rand(2, config.n_obs_steps, *feature.shape) for key, feature in config.input_features.items()}
    batch["action"] = torch.rand(2, config.horizon, *config.action_feature.shape) * 2 - 1
    batch["action_is_pad"] = torch.zeros(2, config.horizon, dtype=torch.bool)
    loss, _ = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_an_unknown_preset_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match="known presets: pusht-image, pusht-state, so-arm-image$"):
        get_preset("pusht-lidar")


REQUIRED = [  # each input the preset names outright, and the action; the arm's cameras are a pattern
    (name, key) for name in sorted(PRESETS) for key in [*INPUTS[name], "action"] if "images." not in key
]


@pytest.mark.parametrize("name, key", REQUIRED)
def test_a_preset_refuses_a_dataset_without_one_of_its_features_and_names_it(name, key):
    features = {k: v for k, v in features_for(name).items() if k != key}
    with pytest.raises(ValueError, match=rf"preset '{name}' needs dataset features \['{key}'\]"):
        get_preset(name).make_config(features, device="cpu")


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
