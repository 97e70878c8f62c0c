"""The faster CPU inference path computes what PyTorch's convolutions and lerobot's denoising loop
compute, and only at inference."""

import dataclasses

import pytest
import torch
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

from fedbot.cpu_inference import (
    InferenceConv1d,
    InferenceConvTranspose1d,
    InferenceDiffusionModel,
    prepare_for_inference,
)
from fedbot.presets import get_preset
from fedbot.recording import dataset_features
from hardware.pusht_sim import PushTSim, PushTSimConfig

CONVS = [
    (torch.nn.Conv1d, InferenceConv1d, kernel, stride, padding)
    for kernel, stride, padding in [(5, 1, 2), (3, 2, 1), (1, 1, 0), (3, 1, 0)]
]
TRANSPOSED = [
    (torch.nn.ConvTranspose1d, InferenceConvTranspose1d, kernel, stride, padding)
    for kernel, stride, padding in [(4, 2, 1), (3, 1, 1), (5, 3, 0)]
]


@pytest.mark.parametrize("torch_class,fast_class,kernel,stride,padding", CONVS + TRANSPOSED)
@pytest.mark.parametrize("batch,length", [(1, 4), (3, 16), (1, 7)])
def test_conv_matches_torch(torch_class, fast_class, kernel, stride, padding, batch, length):
    torch.manual_seed(0)
    conv = torch_class(8, 6, kernel, stride=stride, padding=padding)
    x = torch.randn(batch, 8, length)
    with torch.inference_mode():
        expected = conv(x)
        prepare_for_inference(conv)
        assert type(conv) is fast_class
        got = conv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_the_fast_forms_do_not_cover_keep_their_class():
    layers = [
        torch.nn.Conv1d(4, 4, 3, groups=2),
        torch.nn.Conv1d(4, 4, 3, dilation=2),
        torch.nn.Conv1d(4, 4, 3, padding="same"),
        torch.nn.ConvTranspose1d(4, 4, 3, 2, output_padding=1),
    ]
    for layer in layers:
        kind = type(layer)
        assert type(prepare_for_inference(layer)) is kind


@pytest.mark.parametrize("torch_class", [torch.nn.Conv1d, torch.nn.ConvTranspose1d])
def test_training_gets_torchs_gradients(torch_class):
    torch.manual_seed(0)
    reference = torch_class(4, 4, 3, padding=1)
    prepared = torch_class(4, 4, 3, padding=1)
    prepared.load_state_dict(reference.state_dict())
    prepare_for_inference(prepared)
    x = torch.randn(2, 4, 8)
    for layer in (reference, prepared):
        (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(prepared.weight.grad, reference.weight.grad)
    torch.testing.assert_close(prepared.bias.grad, reference.bias.grad)


def pusht_state_pair(**changes) -> tuple[DiffusionPolicy, DiffusionPolicy]:
    """Two pusht-state policies (with `changes` to the preset) with equal weights; the second prepared."""
    config = get_preset("pusht-state").make_config(dataset_features(PushTSim(PushTSimConfig(id="t"))), device="cpu")
    config = dataclasses.replace(config, **changes)
    torch.manual_seed(0)
    reference = DiffusionPolicy(config).eval()
    prepared = DiffusionPolicy(config).eval()
    prepared.load_state_dict(reference.state_dict())
    return reference, prepare_for_inference(prepared)


@pytest.mark.parametrize(
    "changes", [{}, {"use_film_scale_modulation": False}, {"noise_scheduler_type": "DDPM", "num_inference_steps": 12}]
)
def test_denoising_loop_matches_lerobots(changes):
    """Batch 2, both kinds of FiLM, and DDPM's noise added at each step (same generator state)."""
    reference, prepared = pusht_state_pair(**changes)
    assert type(prepared.diffusion) is InferenceDiffusionModel
    global_cond = torch.randn(
        2,
        prepared.diffusion.unet.down_modules[0][0].cond_encoder[1].in_features
        - prepared.config.diffusion_step_embed_dim,
    )
    noise = torch.randn(2, prepared.config.horizon, 2)
    samples = []
    for policy in (reference, prepared):
        with torch.inference_mode():
            samples.append(
                policy.diffusion.conditional_sample(
                    2, global_cond=global_cond, noise=noise.clone(), generator=torch.Generator().manual_seed(3)
                )
            )
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-4)
    with torch.enable_grad():  # anything that needs gradients takes lerobot's loop and torch's convolutions
        exact = [
            policy.diffusion.conditional_sample(
                2, global_cond=global_cond, noise=noise.clone(), generator=torch.Generator().manual_seed(3)
            )
            for policy in (reference, prepared)
        ]
    assert torch.equal(exact[1], exact[0])


def test_policy_state_and_actions_are_unchanged():
    reference, prepared = pusht_state_pair()
    kinds = {type(m) for m in prepared.modules()}
    assert {InferenceConv1d, InferenceConvTranspose1d, InferenceDiffusionModel} <= kinds
    assert prepared.state_dict().keys() == reference.state_dict().keys()
    observation = {key: torch.rand(1, *feature.shape) for key, feature in prepared.config.input_features.items()}
    actions = []
    for policy in (reference, prepared):
        torch.manual_seed(1)  # the same initial noise for both
        with torch.inference_mode():
            actions.append(policy.select_action(dict(observation)))
    torch.testing.assert_close(actions[1], actions[0], rtol=1e-4, atol=1e-4)
