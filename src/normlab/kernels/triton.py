"""GPU kernels (Triton), with the signatures of :mod:`normlab.kernels.reference`.

* rows form (LN, RMS, GN, IN): one program per row; the row is read once into registers when
  it fits (``D ≤ 8192``), otherwise in chunks; statistics in float32 by the corrected two-pass
  formula; the backward runs a fixed number of programs, each over a strided set of rows, and
  writes per-program partial parameter gradients that one ``sum`` reduces (the Triton
  layer-norm tutorial's scheme);
* channels form (BN training): one program per block of channels, reducing over ``(N, S)`` in
  tiles (float32), then a second pass that writes ``y``; the backward likewise.

Inputs in float32, float16 or bfloat16; sums in float32, the statistics stored in float64 with
the first-pass mean and its correction kept apart, so offsets cost no accuracy (as on the CPU). The same kernels run on the
CPU under ``TRITON_INTERPRET=1``, which is how the test-suite checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 8192


def _block(n: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(n, 1)))


@triton.jit
def _row_moments(X, row, D, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """``(m1, delta, var)`` of row ``row``: the first-pass float32 mean, its correction
    ``mean − m1`` from the second pass (kept apart so ``(x − m1) − delta`` loses nothing to a
    large offset), and the corrected centred variance."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(X + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / D if CENTER else 0.0
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    cs = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        d = tl.where(cols < D, x - mean, 0.0)
        ss += d * d
        cs += d
    comp = tl.sum(cs, axis=0)
    if CENTER:
        var = (tl.sum(ss, axis=0) - comp * comp / D) / D
        delta = comp / D
    else:
        var = tl.sum(ss, axis=0) / D
        delta = 0.0
    return mean, delta, tl.maximum(var, 0.0)


@triton.jit
def _rows_fwd(X, Y, W, B, Mean, Var, D, K, groups, seg, eps, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors of 2**31 elements and more
    m1, delta, var = _row_moments(X, row, D, CENTER, BLOCK)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + row, m1.to(tl.float64) + delta.to(tl.float64))
    tl.store(Var + row, var.to(tl.float64))
    p0 = (row % groups) * K
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        p = p0 + cols // seg
        w = tl.load(W + p, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(B + p, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (((x - m1) - delta) * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rows_bwd(DY, X, M0, C0, Rstd, W, DX, DWP, DBP, R, D, K, groups, seg, nprog,
              CENTER: tl.constexpr, BLOCK: tl.constexpr, REGISTERS: tl.constexpr):
    """dx per row; per program, partial dγ, dβ over its rows (``DWP[pid, p]``).

    ``REGISTERS`` (LayerNorm/RMSNorm rows that fit one block): the partials stay in registers
    across the program's rows and are stored once; otherwise they are added to the program's
    own slice of ``DWP``/``DBP`` (atomics that never contend across programs).
    """
    pid = tl.program_id(0).to(tl.int64)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, R, nprog):
        m0 = tl.load(M0 + row)  # x̂ = (x − m0)·rstd − c0: the saved mean's residual in c0
        c0 = tl.load(C0 + row)
        rstd = tl.load(Rstd + row)
        p0 = (row % groups) * K
        sg = tl.zeros([BLOCK], dtype=tl.float32)
        sgx = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            p = p0 + cols // seg
            w = tl.load(W + p, mask=mask, other=0.0).to(tl.float32)
            xh = tl.where(mask, (x - m0) * rstd - c0, 0.0)
            sg += dy * w
            sgx += dy * w * xh
            if REGISTERS:
                dw_acc += dy * xh
                db_acc += dy
            else:
                tl.atomic_add(DWP + pid * groups * K + p, dy * xh, mask=mask)
                tl.atomic_add(DBP + pid * groups * K + p, dy, mask=mask)
        mg = tl.sum(sg, axis=0) / D if CENTER else 0.0
        mgx = tl.sum(sgx, axis=0) / D
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + p0 + cols // seg, mask=mask, other=0.0).to(tl.float32)
            xh = (x - m0) * rstd - c0
            tl.store(DX + row * D + cols, (rstd * (dy * w - mg - xh * mgx)).to(DX.dtype.element_ty), mask=mask)
    if REGISTERS:
        cols = tl.arange(0, BLOCK)
        tl.store(DWP + pid * D + cols, dw_acc, mask=cols < D)
        tl.store(DBP + pid * D + cols, db_acc, mask=cols < D)


@triton.jit
def _chan_stats(X, Mean, Var, N, C, S, BLOCK: tl.constexpr):
    """Per channel: mean and corrected variance over (N, S) of ``x (N, C, S)``."""
    c = tl.program_id(0).to(tl.int64)
    n_total = N * S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_total, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n_total
        off = (idx // S) * C * S + c * S + idx % S
        acc += tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n_total
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    cs = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_total, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n_total
        off = (idx // S) * C * S + c * S + idx % S
        d = tl.where(mask, tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        ss += d * d
        cs += d
    comp = tl.sum(cs, axis=0)
    tl.store(Mean + c, mean.to(tl.float64) + (comp / n_total).to(tl.float64))
    tl.store(Var + c, tl.maximum((tl.sum(ss, axis=0) - comp * comp / n_total) / n_total, 0.0).to(tl.float64))


@triton.jit
def _chan_apply(X, Y, Scale, Shift, Mean, N, C, S, BLOCK: tl.constexpr):
    """``y = (x − mean)·scale + shift`` per channel, one program per block of elements."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N * C * S
    c = (idx // S) % C
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(Mean + c, mask=mask, other=0.0)
    a = tl.load(Scale + c, mask=mask, other=0.0)
    h = tl.load(Shift + c, mask=mask, other=0.0)
    tl.store(Y + idx, ((x - m) * a + h).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chan_bwd_sums(DY, X, M0, C0, Rstd, SD, SDX, N, C, S, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    n_total = N * S
    m0 = tl.load(M0 + c)
    c0 = tl.load(C0 + c)
    rstd = tl.load(Rstd + c)
    sd = tl.zeros([BLOCK], dtype=tl.float32)
    sdx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_total, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n_total
        off = (idx // S) * C * S + c * S + idx % S
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        sd += dy
        sdx += tl.where(mask, dy * ((x - m0) * rstd - c0), 0.0)
    tl.store(SD + c, tl.sum(sd, axis=0))
    tl.store(SDX + c, tl.sum(sdx, axis=0))


@triton.jit
def _chan_bwd_apply(DY, X, M0, C0, Rstd, W, SD, SDX, DX, N, C, S, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N * C * S
    c = (idx // S) % C
    n_total = N * S
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + idx, mask=mask, other=0.0).to(tl.float32)
    m0 = tl.load(M0 + c, mask=mask, other=0.0)
    c0 = tl.load(C0 + c, mask=mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=mask, other=0.0)
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    mg = tl.load(SD + c, mask=mask, other=0.0) / n_total
    mgx = tl.load(SDX + c, mask=mask, other=0.0) / n_total
    xh = (x - m0) * rstd - c0
    tl.store(DX + idx, (w * rstd * (dy - mg - xh * mgx)).to(DX.dtype.element_ty), mask=mask)


def _param(t, n, fill, like):
    return t.reshape(-1).contiguous() if t is not None else torch.full((n,), fill, dtype=like.dtype, device=like.device)


def _grad_dtype(weight, x):
    """The dtype of dγ, dβ (the CPU core's and the Meta kernels' rule): x's where γ is absent or
    in it, else x's compute dtype (float32 for fp16/bf16)."""
    if weight is None or weight.dtype == x.dtype:
        return x.dtype
    return torch.promote_types(x.dtype, torch.float32)


def _split(mean, rstd):
    """The float64 mean as ``(m0, c0)`` in float32: ``x̂ = (x − m0)·rstd − c0`` (see csrc/norm_cpu.cpp)."""
    m0 = mean.float()
    return m0.contiguous(), ((mean.double() - m0.double()) * rstd.double()).float().contiguous()


def rows_forward(x, weight, bias, eps: float, center: bool, groups: int, seg: int, out=None):
    """``x (R, D)`` → ``(y, mean, var)``; statistics per row, stored in float64."""
    R, D = x.shape
    K = D // seg
    y = torch.empty_like(x) if out is None else out
    mean = torch.empty(R, dtype=torch.float64, device=x.device)
    var = torch.empty(R, dtype=torch.float64, device=x.device)
    w, b = _param(weight, groups * K, 1.0, x), _param(bias, groups * K, 0.0, x)
    _rows_fwd[(R,)](x, y, w, b, mean, var, D, K, groups, seg, eps, CENTER=center, BLOCK=_block(D))
    return y, mean, var


def rows_backward(dy, x, mean, var, weight, eps: float, center: bool, groups: int, seg: int, out=None):
    R, D = x.shape
    rstd = torch.rsqrt(var + eps)
    K = D // seg
    P = groups * K
    nprog = min(R, 4 * _sm_count(x.device))
    dx = torch.empty_like(x) if out is None else out
    dwp = torch.zeros((nprog, P), dtype=torch.float32, device=x.device)
    dbp = torch.zeros((nprog, P), dtype=torch.float32, device=x.device)
    w = _param(weight, P, 1.0, x)
    m0, c0 = _split(mean, rstd)
    _rows_bwd[(nprog,)](dy.contiguous(), x, m0, c0, rstd.float().contiguous(), w, dx, dwp, dbp,
                        R, D, K, groups, seg, nprog, CENTER=center, BLOCK=_block(D),
                        REGISTERS=groups == 1 and seg == 1 and D <= _MAX_BLOCK)
    return dx, dwp.sum(0).to(_grad_dtype(weight, x)), dbp.sum(0).to(_grad_dtype(weight, x))


def channels_stats(x):
    """Per channel of ``x (N, C, S)``: ``(mean, var)``, the biased variance, stored in float64."""
    N, C, S = x.shape
    mean = torch.empty(C, dtype=torch.float64, device=x.device)
    var = torch.empty(C, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    _chan_stats[(C,)](x, mean, var, N, C, S, BLOCK=_block(N * S))
    return mean, var


def channels_forward(x, weight, bias, eps: float, out=None):
    """BN training on ``x (N, C, S)`` → ``(y, mean, var)`` per channel, stored in float64."""
    N, C, S = x.shape
    mean, var = channels_stats(x)
    rstd = torch.rsqrt(var + eps)
    m0 = mean.float().contiguous()
    scale = rstd * _param(weight, C, 1.0, x).double()
    shift = (_param(bias, C, 0.0, x).double() - (mean - m0.double()) * scale).float().contiguous()
    y = torch.empty_like(x) if out is None else out
    block = 1024
    _chan_apply[(triton.cdiv(x.numel(), block),)](x, y, scale.float().contiguous(), shift, m0, N, C, S, BLOCK=block)
    return y, mean, var


def channels_backward(dy, x, mean, var, weight, eps: float, out=None):
    N, C, S = x.shape
    rstd = torch.rsqrt(var + eps)
    dy = dy.contiguous()
    m0, c0 = _split(mean, rstd)
    rstd = rstd.float().contiguous()
    sd = torch.empty(C, dtype=torch.float32, device=x.device)
    sdx = torch.empty(C, dtype=torch.float32, device=x.device)
    _chan_bwd_sums[(C,)](dy, x, m0, c0, rstd, sd, sdx, N, C, S, BLOCK=_block(N * S))
    dx = torch.empty_like(x) if out is None else out
    block = 1024
    _chan_bwd_apply[(triton.cdiv(x.numel(), block),)](dy, x, m0, c0, rstd, _param(weight, C, 1.0, x), sd, sdx, dx,
                                                       N, C, S, BLOCK=block)
    return dx, sdx.to(_grad_dtype(weight, x)), sd.to(_grad_dtype(weight, x))


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def channels_affine(x, mean, scale, shift, out=None):
    """BatchNorm in eval on ``x (N, C, S)``: ``(x − mean)·scale + shift`` per channel."""
    N, C, S = x.shape
    y = torch.empty_like(x) if out is None else out
    block = 1024
    _chan_apply[(triton.cdiv(x.numel(), block),)](x, y, scale.float().contiguous(), shift.float().contiguous(),
                                                   mean.float().contiguous(), N, C, S, BLOCK=block)
    return y


def channels_eval(x, mean, var, weight, bias, eps: float, out=None):
    """BatchNorm in eval from the running statistics: the per-channel map in float64, then
    :func:`channels_affine`'s elementwise kernel."""
    C = x.shape[1]
    m0 = mean.reshape(-1).float()
    scale = torch.rsqrt(var.reshape(-1).double() + eps) * _param(weight, C, 1.0, x).double()
    shift = _param(bias, C, 0.0, x).double() - (mean.reshape(-1).double() - m0.double()) * scale
    return channels_affine(x, m0, scale, shift, out)


def channels_eval_backward(dy, x, mean, var, weight, eps: float, out=None):
    """Backward of :func:`channels_eval`: ``(dx, dweight, dbias)``, the running statistics
    constants (elementwise and two sums: torch's own kernels). ``dx = a·dy``, ``a = γ·r``;
    ``∂l/∂γ = r·(Σ dy·(x − m₀) − (μ − m₀)·Σ dy)`` with ``m₀`` the mean in float32; the parameter
    gradients in float32 or wider (fp16 sums of dy·(x − m₀) overflow)."""
    C, view = x.shape[1], (1, -1, 1)
    r = torch.rsqrt(var.reshape(-1).double() + eps)
    a = (r * _param(weight, C, 1.0, x).double()).view(view).to(dy.dtype)
    dx = torch.mul(dy, a, out=out) if out is not None else dy * a
    m0 = mean.reshape(-1).float()
    dyf = dy.float()
    da = (dyf * (x.float() - m0.view(view))).sum((0, 2)).double()
    db = dyf.sum((0, 2)).double()
    acc = torch.promote_types(x.dtype, torch.float32)
    dw = (da - (mean.reshape(-1).double() - m0.double()) * db) * r
    return dx, dw.to(acc), db.to(acc)
