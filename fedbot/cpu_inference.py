"""A faster CPU path for the DiffusionPolicy's 1-D convolutions at inference time.

Measured (BENCHMARKS.md, "Action-chunk inference latency"): for one sample, PyTorch 2.11 sends
lerobot's `nn.Conv1d` layers to its im2col + GEMM fallback (`aten::_slow_conv2d_forward`;
oneDNN is skipped for batch 1 and small inputs), and that GEMM multiplies weight x columns with
only 4-16 columns, an orientation in which MKL is ~6x slower than columns x weight^T. The
convolutions were 68% of an action chunk. `prepare_for_inference` makes each plain `Conv1d`
compute the same convolution as unfold + `F.linear`, which takes the fast orientation, when
nothing needs gradients and the tensor is on the CPU; training and GPUs keep PyTorch's path.
The parameters and state_dict are untouched (the class of each module changes, nothing else), so
checkpoints, weight transfer and training see the same model. lerobot offers no such switch and
torch's own alternatives were measured and rejected: oneDNN (forced with batch 2) is as slow,
`torch.compile` needs a C++ toolchain and ~40 s per model, `torch.jit.trace` is deprecated.
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


def prepare_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """Give every plain Conv1d in `module` the faster CPU inference path, in place; returns `module`."""
    for layer in module.modules():
        if (
            type(layer) is torch.nn.Conv1d
            and layer.groups == 1
            and layer.dilation == (1,)
            and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)  # not "same"/"valid"
        ):
            layer.__class__ = InferenceConv1d
    return module
