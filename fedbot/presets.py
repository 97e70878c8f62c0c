"""Policy presets: every DiffusionConfig field fedbot depends on, pinned in one place.

lerobot 0.6 changed DiffusionConfig's defaults (horizon 64, batch norm, an ImageNet backbone that
downloads weights), so a preset spells out every field instead of trusting defaults.

- `pusht-image`: the Flower quickstart-lerobot configuration (image + agent state). A GPU job.
- `pusht-state`: agent state + the T's keypoints, sized to learn on 2 CPU cores (see BENCHMARKS.md).
- `so-arm-image`: an SO-100/SO-101 arm: its 6 joint positions and every camera it has
  (`observation.images.*`), images resized to 96x128; a GPU job like pusht-image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE
from lerobot.utils.feature_utils import dataset_to_policy_features


@dataclass(frozen=True)
class Preset:
    """A named DiffusionConfig plus the training settings that go with it."""

    name: str
    input_keys: tuple[str, ...]  # dataset keys; "prefix.*" stands for every key under prefix (cameras)
    batch_size: int
    config: dict = field(repr=False)
    ema_power: float = 0.0  # > 0: train with an EMA of the weights (fedbot/training.py); 0: none

    def inputs(self, dataset_features: dict) -> list[str]:
        """The dataset keys this preset feeds the policy, patterns resolved against `dataset_features`."""
        keys = []
        for pattern in self.input_keys:
            if pattern.endswith(".*"):
                matched = sorted(k for k in dataset_features if k.startswith(pattern[:-1]))
                keys += matched or [pattern]
            else:
                keys.append(pattern)
        return keys

    def make_config(self, dataset_features: dict[str, dict], device: str | None = None) -> DiffusionConfig:
        """The pinned DiffusionConfig with input/output features taken from a dataset's features."""
        features = dataset_to_policy_features(dataset_features)
        keys = self.inputs(dataset_features)
        missing = [k for k in (*keys, ACTION) if k not in features]
        if missing:
            raise ValueError(
                f"preset {self.name!r} needs dataset features {missing}; the dataset has {sorted(features)}"
            )
        inputs = {k: features[k] for k in keys}
        outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=features[ACTION].shape)}
        return DiffusionConfig(
            input_features=inputs,
            output_features=outputs,
            device=device or default_device(),
            push_to_hub=False,
            **self.config,
        )


def default_device() -> str:
    """The GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


_COMMON = dict(
    n_obs_steps=2,
    horizon=16,
    n_action_steps=8,
    drop_n_last_frames=7,
    normalization_mapping={
        "VISUAL": NormalizationMode.MEAN_STD,
        "STATE": NormalizationMode.MIN_MAX,
        "ENV": NormalizationMode.MIN_MAX,  # observation.environment_state; lerobot's default leaves it raw
        "ACTION": NormalizationMode.MIN_MAX,
    },
    vision_backbone="resnet18",
    pretrained_backbone_weights=None,  # never download weights
    resize_shape=None,
    crop_ratio=1.0,
    crop_shape=(84, 84),
    crop_is_random=True,
    use_group_norm=True,
    spatial_softmax_num_keypoints=32,
    use_separate_rgb_encoder_per_camera=False,
    kernel_size=5,
    n_groups=8,
    diffusion_step_embed_dim=128,
    use_film_scale_modulation=True,
    gradient_checkpointing=False,
    num_train_timesteps=100,
    beta_schedule="squaredcos_cap_v2",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    compile_model=False,
    do_mask_loss_for_padding=False,
    optimizer_lr=1e-4,
    optimizer_betas=(0.95, 0.999),
    optimizer_eps=1e-8,
    optimizer_weight_decay=1e-6,
    scheduler_name="cosine",
    scheduler_warmup_steps=500,
    use_amp=False,
)

PRESETS: dict[str, Preset] = {
    "pusht-image": Preset(
        name="pusht-image",
        input_keys=(OBS_IMAGE, OBS_STATE),
        batch_size=64,
        config=dict(
            _COMMON,
            down_dims=(256, 512, 1024),
            noise_scheduler_type="DDPM",
            num_inference_steps=100,
        ),
    ),
    "pusht-state": Preset(
        name="pusht-state",
        input_keys=(OBS_STATE, OBS_ENV_STATE),
        batch_size=64,
        config=dict(
            _COMMON,
            down_dims=(64, 128, 256),
            noise_scheduler_type="DDIM",
            num_inference_steps=10,  # 38-40 ms per chunk on one core; 6 or 8 steps lost coverage (BENCHMARKS.md)
        ),
        ema_power=0.75,  # the Diffusion Policy paper's EMA; it learned much faster per sample (BENCHMARKS.md)
    ),
    "so-arm-image": Preset(
        name="so-arm-image",
        input_keys=(OBS_STATE, "observation.images.*"),
        batch_size=32,
        config=dict(
            _COMMON,
            resize_shape=(96, 128),
            crop_ratio=0.875,
            crop_shape=(84, 112),  # what lerobot derives from resize_shape and crop_ratio
            down_dims=(128, 256, 512),
            noise_scheduler_type="DDIM",
            num_inference_steps=10,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
