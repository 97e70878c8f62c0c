"""A faster CPU path for the DiffusionPolicy's 1-D convolutions at inference time.

Measured (BENCHMARKS.md, "Action-chunk inference latency"): for one sample, PyTorch 2.11 sends
lerobot's `nn.Conv1d` layers to its im2col + GEMM fallback (`aten::_slow_conv2d_forward`;
oneDNN is skipped for batch 1 and small inputs), and that GEMM multiplies weight x columns with
only 4-16 columns, an orientation in which MKL is ~6x slower than columns x weight^T. The
convolutions were 68% of an action chunk; the upsampling `ConvTranspose1d` is slow the same way.
`prepare_for_inference` makes each plain `Conv1d` compute the same convolution as unfold +
`F.linear`, and each `ConvTranspose1d` as `F.linear` + fold, which take the fast orientation, when
nothing needs gradients and the tensor is on the CPU; training and GPUs keep PyTorch's path.
The parameters and state_dict are untouched (the class of each module changes, nothing else), so
checkpoints, weight transfer and training see the same model. lerobot offers no such switch, and
torch's own alternatives were measured (docs/lerobot-0.6.1-traps.md): oneDNN (forced with batch 2)
is as slow; `torch.compile` would remove Python overhead on top of this but needs a C++ toolchain
on the robot and ~40 s per model; `torch.jit.trace` is deprecated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class InferenceConv1d(torch.nn.Conv1d):
    """`nn.Conv1d` whose gradient-free CPU forward is unfold + `F.linear` (same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        (kernel,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        columns = F.pad(x, (padding, padding)).unfold(2, kernel, stride)  # (batch, in, length, kernel)
        columns = columns.transpose(1, 2).flatten(2)  # (batch, length, in * kernel), weight's order
        return F.linear(columns, self.weight.flatten(1), self.bias).transpose(1, 2)


class InferenceConvTranspose1d(torch.nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` whose gradient-free CPU forward is `F.linear` + fold (same result)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or output_size is not None:
            return super().forward(x, output_size)
        (kernel,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        length = (x.shape[-1] - 1) * stride + kernel
        # what each input position adds to its `kernel` outputs: (batch, input length, out * kernel)
        contributions = F.linear(x.transpose(1, 2), self.weight.flatten(1).t())
        full = F.fold(contributions.transpose(1, 2), (1, length), (1, kernel), stride=(1, stride)).squeeze(2)
        out = full[..., padding: length - padding]
        return out if self.bias is None else out + self.bias[:, None]


def prepare_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """Give every plain Conv1d and ConvTranspose1d in `module` the faster CPU inference path, in place;
    returns `module`."""
    for layer in module.modules():
        if type(layer) not in (torch.nn.Conv1d, torch.nn.ConvTranspose1d) or not _plain(layer):
            continue
        layer.__class__ = InferenceConv1d if type(layer) is torch.nn.Conv1d else InferenceConvTranspose1d
    return module


def _plain(layer: torch.nn.Module) -> bool:
    """No groups, dilation, output padding, non-zero or named ("same") padding: what the unfold/fold
    forms cover."""
    return (layer.groups == 1 and layer.dilation == (1,) and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple) and getattr(layer, "output_padding", (0,)) == (0,))
