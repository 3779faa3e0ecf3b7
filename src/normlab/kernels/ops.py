"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node each.

``torch.ops.normlab.rows_forward`` and friends take and return tensors only; the
implementation picks the kernel for the device (numba on the CPU, Triton on CUDA), and a
"fake" implementation gives the output shapes for tracing. Autograd stays with
:class:`normlab.autograd.NormalizeAffine`, which calls the forward op and, when no graph is
being built, the backward op. Statistics come back in float64 from the CPU kernels and in
float32 from the GPU ones.
"""

import torch

_LIB = "normlab"


def _impl(x):
    if x.device.type == "cuda":
        from . import triton

        return triton
    from . import cpu

    return cpu


def _stats(x, n):
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    return x.new_empty(n, dtype=dtype), x.new_empty(n, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::rows_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center, int groups, int seg)"
                                " -> (Tensor, Tensor, Tensor)")
def rows_forward(x, weight, bias, eps, center, groups, seg):
    return _impl(x).rows_forward(x, weight, bias, eps, center, groups, seg)


@rows_forward.register_fake
def _(x, weight, bias, eps, center, groups, seg):
    return (torch.empty_like(x), *_stats(x, x.shape[0]))


@torch.library.custom_op(f"{_LIB}::rows_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, float eps, bool center,"
                                " int groups, int seg) -> (Tensor, Tensor, Tensor)")
def rows_backward(dy, x, mean, rstd, weight, eps, center, groups, seg):
    return _impl(x).rows_backward(dy, x, mean, rstd, weight, eps, center, groups, seg)


@rows_backward.register_fake
def _(dy, x, mean, rstd, weight, eps, center, groups, seg):
    p = groups * (x.shape[1] // seg)
    return torch.empty_like(x), x.new_empty(p), x.new_empty(p)


@torch.library.custom_op(f"{_LIB}::channels_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)")
def channels_forward(x, weight, bias, eps):
    return _impl(x).channels_forward(x, weight, bias, eps)


@channels_forward.register_fake
def _(x, weight, bias, eps):
    return (torch.empty_like(x), *_stats(x, x.shape[1]))


@torch.library.custom_op(f"{_LIB}::channels_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, float eps)"
                                " -> (Tensor, Tensor, Tensor)")
def channels_backward(dy, x, mean, rstd, weight, eps):
    return _impl(x).channels_backward(dy, x, mean, rstd, weight, eps)


@channels_backward.register_fake
def _(dy, x, mean, rstd, weight, eps):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)
