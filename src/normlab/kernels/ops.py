"""The Triton kernels of :mod:`normlab.kernels.triton` as the CUDA implementation of the form
operators (``torch.ops.normlab.rows_forward`` and friends, defined in C++ with their CPU and
Meta kernels, see :mod:`normlab.kernels`).

Each operator takes ``x`` in its own shape and layout plus the canonical view to compute in and
returns ``y``/``dx`` as fresh tensors in ``x``'s shape and memory format: the Triton kernels
take canonical views and write into ``out``, so ``y``/``dx`` are allocated here in x's layout
and the kernel writes through their canonical view, without a copy. Registered only where
Triton is installed; Triton itself is imported at the first CUDA call.
"""

import importlib.util

import torch


def _view(t, shape, permute):
    """``t`` (shaped like ``x``) in the canonical layout, without a copy."""
    return (t.permute(permute) if permute else t).reshape(shape)


def _register_triton() -> None:
    lib = torch.library.Library("normlab", "IMPL")  # kept alive below: dropping it unregisters
    _REGISTERED.append(lib)

    def triton():
        from . import triton as tk  # imported at the first CUDA call (seconds), never for the CPU

        return tk

    def rows_forward(x, weight, bias, eps, center, groups, seg, shape):
        y = torch.empty_like(x)
        _, mean, var = triton().rows_forward(x.view(shape), weight, bias, eps, center, groups, seg, out=y.view(shape))
        return y, mean, var

    def rows_backward(dy, x, mean, var, weight, eps, center, groups, seg, shape):
        dx = torch.empty_like(x)
        _, dw, db = triton().rows_backward(dy.contiguous().view(shape), x.view(shape), mean, var, weight, eps, center,
                                          groups, seg, out=dx.view(shape))
        return dx, dw, db

    def channels_forward(x, weight, bias, eps, shape, permute):
        y = torch.empty_like(x)
        _, mean, var = triton().channels_forward(_view(x, shape, permute), weight, bias, eps,
                                                 out=_view(y, shape, permute))
        return y, mean, var

    def channels_backward(dy, x, mean, var, weight, eps, shape, permute):
        dx = torch.empty_like(x)
        dyv = _view(dy, shape, permute).contiguous()
        _, dw, db = triton().channels_backward(dyv, _view(x, shape, permute), mean, var, weight, eps,
                                               out=_view(dx, shape, permute))
        return dx, dw, db

    def channels_stats(x, shape, permute):
        return triton().channels_stats(_view(x, shape, permute).contiguous())

    def channels_eval(x, mean, var, weight, bias, eps, shape, permute):
        y = torch.empty_like(x)
        triton().channels_eval(_view(x, shape, permute), mean, var, weight, bias, eps, out=_view(y, shape, permute))
        return y

    def channels_eval_backward(dy, x, mean, var, weight, eps, shape, permute):
        dx = torch.empty_like(x)
        dyv = _view(dy, shape, permute).contiguous()
        _, dw, db = triton().channels_eval_backward(dyv, _view(x, shape, permute), mean, var, weight, eps,
                                                    out=_view(dx, shape, permute))
        return dx, dw, db

    for fn in (rows_forward, rows_backward, channels_forward, channels_backward, channels_stats, channels_eval,
               channels_eval_backward):
        lib.impl(fn.__name__, fn, "CUDA")


_REGISTERED: list = []
if importlib.util.find_spec("triton") is not None:
    _register_triton()
