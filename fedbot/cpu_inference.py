"""Faster CPU inference for lerobot's DiffusionPolicy; results equal lerobot's to 1e-4, not bit for bit
(BENCHMARKS.md, "Action-chunk inference latency"). `prepare_for_inference` changes the class of
modules in place; parameters and state_dict are untouched, so checkpoints, weight transfer and
training see the same model, and training (anything with gradients) and GPUs keep lerobot's and
PyTorch's code, as a compiled UNet (lerobot's `compile_model`) keeps lerobot's denoising loop.
lerobot offers no such switch.

Convolutions. For one sample, PyTorch 2.11 sends `nn.Conv1d` to its im2col + GEMM fallback
(`aten::_slow_conv2d_forward`; oneDNN is skipped for batch 1 and small inputs), and that GEMM
multiplies weight x columns with only 4-16 columns, an orientation in which MKL is ~6x slower than
columns x weight^T. The convolutions were 68% of an action chunk; the upsampling `ConvTranspose1d` is
slow the same way. Each plain `Conv1d` becomes unfold + `F.linear`, each `ConvTranspose1d`
`F.linear` + fold, which take the fast orientation.

The denoising loop. lerobot's `conditional_sample` runs the whole UNet once per denoising step,
including the timestep encoder and every residual block's FiLM encoder (Mish + Linear), although
these depend only on the step and the observation. `InferenceDiffusionModel` computes the FiLM
embeddings of all steps at once, in one batched pass per block, and then runs the convolutional path
of the UNet without nn.Module call overhead (pusht-state: 48-53 -> 38-40 ms per chunk on top of
the convolutions; lerobot as is: 73-78 ms).

torch's own alternatives were measured (docs/lerobot-0.6.1-traps.md): oneDNN (forced with batch 2) is
as slow; `torch.compile` would remove Python overhead too but needs a C++ toolchain on the robot and
~40 s per model; `torch.jit.trace` is deprecated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lerobot.policies.diffusion.modeling_diffusion import (
    DiffusionConditionalResidualBlock1d,
    DiffusionConv1dBlock,
    DiffusionModel,
)
from lerobot.policies.utils import get_device_from_parameters, get_dtype_from_parameters


class InferenceConv1d(torch.nn.Conv1d):
    """`nn.Conv1d` whose gradient-free CPU forward is unfold + `F.linear` (equal to 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        (kernel,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        columns = F.pad(x, (padding, padding)).unfold(2, kernel, stride)  # (batch, in, length, kernel)
        columns = columns.transpose(1, 2).flatten(2)  # (batch, length, in * kernel), weight's order
        return F.linear(columns, self.weight.flatten(1), self.bias).transpose(1, 2)


class InferenceConvTranspose1d(torch.nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` whose gradient-free CPU forward is `F.linear` + fold (equal to 1e-5)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or output_size is not None:
            return super().forward(x, output_size)
        (kernel,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        length = (x.shape[-1] - 1) * stride + kernel
        # what each input position adds to its `kernel` outputs: (batch, input length, out * kernel)
        contributions = F.linear(x.transpose(1, 2), self.weight.flatten(1).t())
        full = F.fold(contributions.transpose(1, 2), (1, length), (1, kernel), stride=(1, stride)).squeeze(2)
        out = full[..., padding : length - padding]
        return out if self.bias is None else out + self.bias[:, None]


class InferenceDiffusionModel(DiffusionModel):
    """lerobot's `DiffusionModel` whose gradient-free CPU `conditional_sample` computes every denoising
    step's FiLM embeddings at once and runs the UNet's convolutional path without module calls."""

    def conditional_sample(self, batch_size, global_cond=None, generator=None, noise=None):
        device, dtype = get_device_from_parameters(self), get_dtype_from_parameters(self)
        if torch.is_grad_enabled() or device.type != "cpu" or self.config.compile_model:
            return super().conditional_sample(batch_size, global_cond, generator, noise)
        # from here on as lerobot's conditional_sample, except where the UNet is called
        sample = (
            noise
            if noise is not None
            else torch.randn(
                size=(batch_size, self.config.horizon, self.config.action_feature.shape[0]),
                dtype=dtype,
                device=device,
                generator=generator,
            )
        )
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        timesteps = self.noise_scheduler.timesteps
        film = _film_embeddings(self.unet, timesteps.to(device), global_cond, batch_size)
        for step, t in enumerate(timesteps):
            model_output = _unet_convolutions(self.unet, sample, [embedding[step] for embedding in film])
            sample = self.noise_scheduler.step(model_output, t, sample, generator=generator).prev_sample
        return sample


def _residual_blocks(unet: torch.nn.Module) -> list[DiffusionConditionalResidualBlock1d]:
    """The UNet's residual blocks in the order its forward calls them."""
    return [
        *(block for level in unet.down_modules for block in level[:2]),
        *unet.mid_modules,
        *(block for level in unet.up_modules for block in level[:2]),
    ]


def _film_embeddings(unet, timesteps: torch.Tensor, global_cond, batch_size: int) -> list[torch.Tensor]:
    """Each residual block's FiLM embedding for every step, (steps, batch, channels, 1), as lerobot's
    UNet computes them one step at a time (timestep encoder, concatenated global conditioning)."""
    feature = unet.diffusion_step_encoder(timesteps)[:, None].expand(-1, batch_size, -1)
    if global_cond is not None:
        feature = torch.cat([feature, global_cond.expand(len(timesteps), -1, -1)], dim=-1)
    return [block.cond_encoder(feature).unsqueeze(-1) for block in _residual_blocks(unet)]


def _unet_convolutions(unet, x: torch.Tensor, film: list[torch.Tensor]) -> torch.Tensor:
    """lerobot's `DiffusionConditionalUnet1d.forward` given the blocks' FiLM embeddings, (B, T, D) -> (B, T, D)."""
    film = iter(film)
    x = x.transpose(1, 2)
    skips = []
    for first, second, downsample in unet.down_modules:
        x = _residual_block(second, _residual_block(first, x, next(film)), next(film))
        skips.append(x)
        x = downsample(x)
    for block in unet.mid_modules:
        x = _residual_block(block, x, next(film))
    for first, second, upsample in unet.up_modules:
        x = torch.cat((x, skips.pop()), dim=1)
        x = upsample(_residual_block(second, _residual_block(first, x, next(film)), next(film)))
    return unet.final_conv(x).transpose(1, 2)


def _residual_block(block: DiffusionConditionalResidualBlock1d, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
    """lerobot's `DiffusionConditionalResidualBlock1d.forward` given its FiLM embedding."""
    out = _conv_block(block.conv1, x)
    if block.use_film_scale_modulation:
        out = torch.addcmul(film[:, block.out_channels :], film[:, : block.out_channels], out)  # scale * out + bias
    else:
        out = out + film
    out = _conv_block(block.conv2, out)
    residual = x if isinstance(block.residual_conv, torch.nn.Identity) else block.residual_conv.forward(x)
    return out + residual


def _conv_block(block: DiffusionConv1dBlock, x: torch.Tensor) -> torch.Tensor:
    """lerobot's `DiffusionConv1dBlock`: Conv1d, GroupNorm, Mish."""
    conv, norm, _ = block.block
    return F.mish(F.group_norm(conv.forward(x), norm.num_groups, norm.weight, norm.bias, norm.eps))


def prepare_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """Give every plain Conv1d and ConvTranspose1d, and every DiffusionModel, in `module` the faster CPU
    inference path, in place; returns `module`."""
    for layer in module.modules():
        if type(layer) is DiffusionModel:
            layer.__class__ = InferenceDiffusionModel
        elif type(layer) in (torch.nn.Conv1d, torch.nn.ConvTranspose1d) and _plain(layer):
            layer.__class__ = InferenceConv1d if type(layer) is torch.nn.Conv1d else InferenceConvTranspose1d
    return module


def _plain(layer: torch.nn.Module) -> bool:
    """No groups, dilation, output padding, non-zero or named ("same") padding: what the unfold/fold
    forms cover."""
    return (
        layer.groups == 1
        and layer.dilation == (1,)
        and layer.padding_mode == "zeros"
        and isinstance(layer.padding, tuple)
        and getattr(layer, "output_padding", (0,)) == (0,)
    )
