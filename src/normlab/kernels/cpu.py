"""Fused CPU kernels (numba): one pass over memory per direction, parallel over rows or channels.

Same signatures as :mod:`normlab.kernels.reference`, which is their oracle (see
:mod:`normlab.kernels` for the two canonical forms, *rows* and *channels*).

Numerics, shared by every kernel here (the reference's corrected two-pass algorithm is the
oracle they are tested against):

* statistics in float64 whatever the input (float32 or float64), in one pass: the sums of
  ``d = x − x₀`` and ``d²`` with ``x₀`` the first value of the row or channel, so a large common
  offset cancels exactly before anything is squared; the variance ``(Σd² − (Σd)²/n)/n`` then
  loses nothing unless ``x₀`` lies ~10⁶ standard deviations from the mean (float64 keeps
  1e-4 relative even there);
* the output in the input's precision with the mean split into ``m₀ = float(mean)`` and the
  residual ``mean − m₀`` folded into the shift, so data with a large offset (1e4 ± 1 in float32)
  normalizes without catastrophic cancellation: ``(x − m₀)`` is exact when ``x`` is close to
  ``m₀`` (Sterbenz);
* parameter gradients are accumulated in float64 per block of rows, then summed.

Why numba: the kernels are loops that must fuse the statistics, the normalization and the
affine map into one pass over memory, parallel over rows; numba compiles such loops to
vectorised machine code (LLVM) from Python in the repository, with no C++ toolchain at install
time, and its ``cache=True`` keeps the compiled code between processes.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorise the float64 reductions; no FMA contraction (x̂·γ·dy − mean(g)
# must cancel exactly when it is 0) and no "nnan"/"ninf", so NaN and inf
# propagate exactly as in the reference.
_FM = {"reassoc", "nsz", "arcp"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FM, nogil=True)


_THREADS = numba.get_num_threads()  # read once: asking numba costs ~1 µs a call


@njit(inline="always")
def _finish(n, shift, s, ss, center, eps):
    """Mean, biased variance and rstd from the shifted sums ``s = Σd``, ``ss = Σd²``, ``d = x − shift``."""
    if center:
        md = s / n
        var = (ss - s * md) / n
        m = shift + md
    else:
        var = ss / n
        m = 0.0
    if var < 0.0:
        var = 0.0
    return m, var, 1.0 / math.sqrt(var + eps)


@njit(inline="always")
def _row_stats(x, r, D, center, eps):
    # one pass, float64 sums of d = x − x[r, 0] (shifted by a sample of the row: offsets cost nothing)
    shift = np.float64(x[r, 0]) if center else 0.0
    s = 0.0
    ss = 0.0
    for j in range(D):
        d = np.float64(x[r, j]) - shift
        s += d
        ss += d * d
    return _finish(D, shift, s, ss, center, eps)


@njit(**_OPTS)
def _k_rows_forward_elem(x, w, b, eps, center, y, mean, var):
    """LN/RMS: rows of ``x (R, D)``; γ, β per column."""
    R, D = x.shape
    for r in prange(R):
        m, v, rs = _row_stats(x, r, D, center, eps)
        mean[r] = m
        var[r] = v
        m0 = x.dtype.type(m)
        rs0 = x.dtype.type(rs)
        c0 = x.dtype.type((m - m0) * rs)
        for j in range(D):
            y[r, j] = ((x[r, j] - m0) * rs0 - c0) * w[j] + b[j]


@njit(**_OPTS)
def _k_rows_forward_seg(x, w, b, eps, center, groups, seg, y, mean, var):
    """GN/IN: rows of ``x (R, D)``, D = K·seg; γ, β index ``(r % groups)·K + j // seg``."""
    R, D = x.shape
    K = D // seg
    for r in prange(R):
        m, v, rs = _row_stats(x, r, D, center, eps)
        mean[r] = m
        var[r] = v
        m0 = x.dtype.type(m)
        p0 = (r % groups) * K
        for k in range(K):
            scale = rs * w[p0 + k]
            s0 = x.dtype.type(scale)
            h0 = x.dtype.type(b[p0 + k] - (m - m0) * scale)
            base = k * seg
            for s in range(seg):
                y[r, base + s] = (x[r, base + s] - m0) * s0 + h0


@njit(inline="always")
def _saved(x, m, v, eps):
    """The saved float64 statistics in x's precision: ``x̂ = (x − m₀)·r₀ − c₀`` with the mean's
    rounding residual folded into ``c₀`` (see the module docstring); ``rs`` exactly as the
    forward computed it from the saved biased variance ``v``."""
    rs = 1.0 / math.sqrt(v + eps)
    m0 = x.dtype.type(m)
    return m, rs, m0, x.dtype.type(rs), x.dtype.type((m - m0) * rs)


@njit(inline="always")
def _sum_column(dwp, dbp, dw, db, j):
    a = 0.0
    c = 0.0
    for blk in range(dwp.shape[0]):
        a += dwp[blk, j]
        c += dbp[blk, j]
    dw[j] = a
    db[j] = c


@njit(inline="always")
def _sum_blocks(dwp, dbp, dw, db):
    """Parameter gradients: the per-block partials summed in float64, stored in x's precision."""
    nblk, P = dwp.shape
    if nblk * P < 65536:  # small: a parallel region would cost more than it saves
        for j in range(P):
            _sum_column(dwp, dbp, dw, db, j)
    else:
        for j in prange(P):
            _sum_column(dwp, dbp, dw, db, j)


def _blocks(R: int) -> int:
    """Blocks of rows for the parallel loops: a few per thread, and at most 256 rows each (the
    backward's per-block partial sums run in x's precision)."""
    return max(1, min(R, max(4 * _THREADS, -(-R // 256))))


@njit(**_OPTS)
def _k_rows_backward_elem(dy, x, mean, var, w, eps, center, nblk, dx, dw, db):
    """LN/RMS backward: ``dx = r·(g − mean(g) − x̂·mean(g·x̂))``, g = γ·dy; dγ, dβ partials per block.

    The row sums and the block's parameter partials accumulate in x's precision (rows of at
    most a few thousand values, blocks of at most 256 rows: float32 rounding stays below 1e-6),
    the blocks are summed in float64.
    """
    R, D = x.shape
    per = (R + nblk - 1) // nblk
    dwp = np.empty((nblk, D))
    dbp = np.empty((nblk, D))
    for blk in prange(nblk):
        dwl = np.zeros(D, x.dtype)
        dbl = np.zeros(D, x.dtype)
        for r in range(blk * per, min(R, (blk + 1) * per)):
            m, rs, m0, rs0, c0 = _saved(x, mean[r], var[r], eps)
            sg = x.dtype.type(0.0)
            sgx = x.dtype.type(0.0)
            for j in range(D):
                xh = (x[r, j] - m0) * rs0 - c0
                g = dy[r, j] * w[j]
                sg += g
                sgx += g * xh
                dwl[j] += dy[r, j] * xh
                dbl[j] += dy[r, j]
            mg = x.dtype.type(sg / D) if center else x.dtype.type(0.0)
            mgx = x.dtype.type(sgx / D)
            for j in range(D):
                xh = (x[r, j] - m0) * rs0 - c0
                dx[r, j] = rs0 * (dy[r, j] * w[j] - mg - xh * mgx)
        for j in range(D):
            dwp[blk, j] = dwl[j]
            dbp[blk, j] = dbl[j]
    _sum_blocks(dwp, dbp, dw, db)


@njit(**_OPTS)
def _k_rows_backward_seg(dy, x, mean, var, w, eps, center, groups, seg, nblk, dx, dw, db):
    """GN/IN backward; dγ, dβ partials per block over the ``groups·K`` parameters."""
    R, D = x.shape
    K = D // seg
    per = (R + nblk - 1) // nblk
    dwp = np.zeros((nblk, groups * K))
    dbp = np.zeros((nblk, groups * K))
    for blk in prange(nblk):
        for r in range(blk * per, min(R, (blk + 1) * per)):
            m, rs, m0, rs0, c0 = _saved(x, mean[r], var[r], eps)
            p0 = (r % groups) * K
            sg = 0.0
            sgx = 0.0
            for k in range(K):
                wk = w[p0 + k]
                sd = 0.0
                sdx = 0.0
                base = k * seg
                for s in range(seg):
                    xh = (x[r, base + s] - m0) * rs0 - c0
                    sd += dy[r, base + s]
                    sdx += dy[r, base + s] * xh
                dwp[blk, p0 + k] += sdx
                dbp[blk, p0 + k] += sd
                sg += wk * sd
                sgx += wk * sdx
            mg = x.dtype.type(sg / D) if center else x.dtype.type(0.0)
            mgx = x.dtype.type(sgx / D)
            for k in range(K):
                wk = w[p0 + k]
                base = k * seg
                for s in range(seg):
                    xh = (x[r, base + s] - m0) * rs0 - c0
                    dx[r, base + s] = rs0 * (dy[r, base + s] * wk - mg - xh * mgx)
    _sum_blocks(dwp, dbp, dw, db)


@njit(**_OPTS)
def _k_channels_forward(x, w, b, eps, y, mean, var):
    """BN training on ``x (N, C, S)``, S > 1: statistics per channel over (N, S), parallel over C."""
    N, C, S = x.shape
    n = N * S
    for c in prange(C):
        shift = np.float64(x[0, c, 0])
        s = 0.0
        ss = 0.0
        for i in range(N):
            for k in range(S):
                d = np.float64(x[i, c, k]) - shift
                s += d
                ss += d * d
        m, v, rs = _finish(n, shift, s, ss, True, eps)
        mean[c] = m
        var[c] = v
        m0 = x.dtype.type(m)
        scale = rs * w[c]
        s0 = x.dtype.type(scale)
        h0 = x.dtype.type(b[c] - (m - m0) * scale)
        for i in range(N):
            for k in range(S):
                y[i, c, k] = (x[i, c, k] - m0) * s0 + h0


@njit(**_OPTS)
def _k_channels_backward(dy, x, mean, var, w, eps, dx, dw, db):
    """BN training backward on ``(N, C, S)``, parallel over C."""
    N, C, S = x.shape
    n = N * S
    for c in prange(C):
        m, rs, m0, rs0, c0 = _saved(x, mean[c], var[c], eps)
        sd = 0.0
        sdx = 0.0
        for i in range(N):
            for k in range(S):
                xh = (x[i, c, k] - m0) * rs0 - c0
                sd += dy[i, c, k]
                sdx += dy[i, c, k] * xh
        dw[c] = sdx
        db[c] = sd
        a = x.dtype.type(w[c] * rs)
        mg = x.dtype.type(sd / n)
        mgx = x.dtype.type(sdx / n)
        for i in range(N):
            for k in range(S):
                xh = (x[i, c, k] - m0) * rs0 - c0
                dx[i, c, k] = a * (dy[i, c, k] - mg - xh * mgx)


@njit(**_OPTS)
def _k_columns_forward(x, w, b, eps, nblk, y, mean, var):
    """BN training on ``x (M, C)`` (2-D input, channels_last), parallel over blocks of rows:
    per block a two-pass mean and M2 per column (the block is in cache), merged with Chan's
    formula, then the affine map."""
    M, C = x.shape
    per = (M + nblk - 1) // nblk
    part_n = np.zeros(nblk)
    part_mean = np.zeros((nblk, C))
    part_m2 = np.zeros((nblk, C))
    for blk in prange(nblk):
        lo, hi = blk * per, min(M, (blk + 1) * per)
        cnt = hi - lo
        part_n[blk] = cnt
        if cnt <= 0:
            continue
        acc = np.zeros(C)
        for i in range(lo, hi):
            for c in range(C):
                acc[c] += x[i, c]
        for c in range(C):
            acc[c] /= cnt
            part_mean[blk, c] = acc[c]
        m2 = np.zeros(C)
        cs = np.zeros(C)
        for i in range(lo, hi):
            for c in range(C):
                d = x[i, c] - acc[c]
                m2[c] += d * d
                cs[c] += d
        for c in range(C):
            v = m2[c] - cs[c] * cs[c] / cnt
            part_m2[blk, c] = v if v > 0.0 else 0.0
    m0 = np.empty(C, x.dtype)
    s0 = np.empty(C, x.dtype)
    h0 = np.empty(C, x.dtype)
    for c in range(C):
        n = 0.0
        m = 0.0
        m2 = 0.0
        for blk in range(nblk):
            nb = part_n[blk]
            if nb <= 0:
                continue
            d = part_mean[blk, c] - m
            tot = n + nb
            m += d * nb / tot
            m2 += part_m2[blk, c] + d * d * n * nb / tot
            n = tot
        mean[c] = m
        var[c] = m2 / n
        m0[c] = m
        scale = w[c] / math.sqrt(var[c] + eps)
        s0[c] = scale
        h0[c] = b[c] - (m - np.float64(m0[c])) * scale
    for blk in prange(nblk):
        for i in range(blk * per, min(M, (blk + 1) * per)):
            for c in range(C):
                y[i, c] = (x[i, c] - m0[c]) * s0[c] + h0[c]


@njit(**_OPTS)
def _k_columns_backward(dy, x, mean, var, w, eps, nblk, dx, dw, db):
    """BN training backward on ``(M, C)``: per-block float64 sums of ``dy`` and ``dy·x̂``, then
    ``dx`` in a second parallel pass."""
    M, C = x.shape
    m0 = np.empty(C, x.dtype)
    rs0 = np.empty(C, x.dtype)
    c0 = np.empty(C, x.dtype)
    a = np.empty(C, x.dtype)
    for c in range(C):
        _, rs, m0[c], rs0[c], c0[c] = _saved(x, mean[c], var[c], eps)
        a[c] = w[c] * rs
    per = (M + nblk - 1) // nblk
    part_d = np.zeros((nblk, C))
    part_dx = np.zeros((nblk, C))
    for blk in prange(nblk):
        for i in range(blk * per, min(M, (blk + 1) * per)):
            for c in range(C):
                xh = (x[i, c] - m0[c]) * rs0[c] - c0[c]
                part_d[blk, c] += dy[i, c]
                part_dx[blk, c] += dy[i, c] * xh
    mg = np.empty(C, x.dtype)
    mgx = np.empty(C, x.dtype)
    for c in range(C):
        sd = 0.0
        sdx = 0.0
        for blk in range(nblk):
            sd += part_d[blk, c]
            sdx += part_dx[blk, c]
        db[c] = sd
        dw[c] = sdx
        mg[c] = sd / M
        mgx[c] = sdx / M
    for blk in prange(nblk):
        for i in range(blk * per, min(M, (blk + 1) * per)):
            for c in range(C):
                xh = (x[i, c] - m0[c]) * rs0[c] - c0[c]
                dx[i, c] = a[c] * (dy[i, c] - mg[c] - xh * mgx[c])


@njit(**_OPTS)
def _k_affine_ncs(x, mean, scale, shift, y):
    """BN eval on ``(N, C, S)``: ``y = (x − mean[c])·scale[c] + shift[c]``, parallel over (N, C)."""
    N, C, S = x.shape
    for ic in prange(N * C):
        i, c = ic // C, ic % C
        m0, a0, h0 = mean[c], scale[c], shift[c]
        for k in range(S):
            y[i, c, k] = (x[i, c, k] - m0) * a0 + h0


@njit(cache=True, nogil=True)
def _k_eval_coefficients(rm, rv, w, b, eps, m0, a0, h0):
    """BN eval's per-channel map from the running statistics, in float64:
    ``y = (x − m₀)·a + h`` with ``a = γ/√(σ²+ε)`` and the mean's rounding residual in ``h``."""
    for c in range(rm.shape[0]):
        m = np.float64(rm[c])
        a = w[c] / math.sqrt(np.float64(rv[c]) + eps)
        m0[c] = m
        a0[c] = a
        h0[c] = b[c] - (m - np.float64(m0[c])) * a


@njit(**_OPTS)
def _k_affine_mc(x, mean, scale, shift, nblk, y):
    """BN eval on ``(M, C)`` (2-D, channels_last), parallel over blocks of rows."""
    M, C = x.shape
    per = (M + nblk - 1) // nblk
    for blk in prange(nblk):
        for i in range(blk * per, min(M, (blk + 1) * per)):
            for c in range(C):
                y[i, c] = (x[i, c] - mean[c]) * scale[c] + shift[c]


@njit(**_OPTS)
def _k_affine_bwd_ncs(dy, x, mean, scale, dx, da, db):
    """BN eval backward on ``(N, C, S)``: ``dx = a·dy``; ``Σ dy·(x − μ)`` and ``Σ dy`` per channel."""
    N, C, S = x.shape
    for c in prange(C):
        m0, a0 = mean[c], scale[c]
        sa = 0.0
        sb = 0.0
        for i in range(N):
            for k in range(S):
                g = dy[i, c, k]
                sa += g * (x[i, c, k] - m0)
                sb += g
                dx[i, c, k] = g * a0
        da[c] = sa
        db[c] = sb


@njit(**_OPTS)
def _k_affine_bwd_mc(dy, x, mean, scale, nblk, dx, da, db):
    M, C = x.shape
    per = (M + nblk - 1) // nblk
    pa = np.zeros((nblk, C))
    pb = np.zeros((nblk, C))
    for blk in prange(nblk):
        for i in range(blk * per, min(M, (blk + 1) * per)):
            for c in range(C):
                g = dy[i, c]
                pa[blk, c] += g * (x[i, c] - mean[c])
                pb[blk, c] += g
                dx[i, c] = g * scale[c]
    _sum_blocks(pa, pb, da, db)


@njit(inline="always")
def _group_stats(x, n, cg, eps, gm0, grs, mean, var, G):
    """Per-channel shifted sums over S, merged per group of ``cg`` channels (Chan et al.)."""
    S, C = x.shape[1], x.shape[2]
    s = np.zeros(C)
    ss = np.zeros(C)
    for k in range(S):
        for c in range(C):
            d = np.float64(x[n, k, c]) - np.float64(x[n, 0, c])
            s[c] += d
            ss[c] += d * d
    for g in range(G):
        m = 0.0
        for c in range(g * cg, (g + 1) * cg):
            m += np.float64(x[n, 0, c]) + s[c] / S
        m /= cg
        m2 = 0.0
        for c in range(g * cg, (g + 1) * cg):
            mc = np.float64(x[n, 0, c]) + s[c] / S
            m2 += (ss[c] - s[c] * s[c] / S) + S * (mc - m) * (mc - m)
        v = m2 / (S * cg)
        if v < 0.0:
            v = 0.0
        rs = 1.0 / math.sqrt(v + eps)
        mean[n * G + g] = m
        var[n * G + g] = v
        gm0[g] = m
        grs[g] = rs


@njit(**_OPTS)
def _k_groups_forward(x, w, b, eps, G, y, mean, var):
    """GroupNorm/InstanceNorm on channels_last ``x (N, S, C)``: statistics per (sample, group of
    C/G adjacent channels), parallel over samples; the channel loop is innermost (contiguous)."""
    N, S, C = x.shape
    cg = C // G
    for n in prange(N):
        gm = np.empty(G)
        grs = np.empty(G)
        _group_stats(x, n, cg, eps, gm, grs, mean, var, G)
        m0 = np.empty(C, x.dtype)
        a0 = np.empty(C, x.dtype)
        h0 = np.empty(C, x.dtype)
        for c in range(C):
            g = c // cg
            m0[c] = gm[g]
            scale = grs[g] * w[c]
            a0[c] = scale
            h0[c] = b[c] - (gm[g] - np.float64(m0[c])) * scale
        for k in range(S):
            for c in range(C):
                y[n, k, c] = (x[n, k, c] - m0[c]) * a0[c] + h0[c]


@njit(**_OPTS)
def _k_groups_backward(dy, x, mean, var, w, eps, G, dx, dw, db):
    N, S, C = x.shape
    cg = C // G
    dwp = np.empty((N, C))
    dbp = np.empty((N, C))
    for n in prange(N):
        m0 = np.empty(C, x.dtype)
        rs0 = np.empty(C, x.dtype)
        c0 = np.empty(C, x.dtype)
        for c in range(C):
            g = c // cg
            _, _, m0[c], rs0[c], c0[c] = _saved(x, mean[n * G + g], var[n * G + g], eps)
        sd = np.zeros(C)
        sdx = np.zeros(C)
        for k in range(S):
            for c in range(C):
                xh = (x[n, k, c] - m0[c]) * rs0[c] - c0[c]
                sd[c] += dy[n, k, c]
                sdx[c] += dy[n, k, c] * xh
        mg = np.zeros(G)
        mgx = np.zeros(G)
        for c in range(C):
            dwp[n, c] = sdx[c]
            dbp[n, c] = sd[c]
            mg[c // cg] += w[c] * sd[c]
            mgx[c // cg] += w[c] * sdx[c]
        a = np.empty(C, x.dtype)
        b0 = np.empty(C, x.dtype)
        b1 = np.empty(C, x.dtype)
        for c in range(C):
            g = c // cg
            a[c] = w[c]
            b0[c] = mg[g] / (S * cg)
            b1[c] = mgx[g] / (S * cg)
        for k in range(S):
            for c in range(C):
                xh = (x[n, k, c] - m0[c]) * rs0[c] - c0[c]
                dx[n, k, c] = rs0[c] * (dy[n, k, c] * a[c] - b0[c] - xh * b1[c])
    _sum_blocks(dwp, dbp, dw, db)


# ---------------------------------------------------------------------- torch-level entry points
# Same signatures as normlab.kernels.reference; tensors in, tensors out (numpy views, no copies).
# ``out`` (y or dx), when given, is a view in the canonical layout of a tensor the caller owns.
# Every per-call cost here is paid on each layer of a network: buffers come from numpy (cheaper
# than torch's allocator for the small ones), the kernels reduce the parameter gradients
# themselves, and backward kernels take the saved variance (rstd is recomputed in the kernel,
# bit for bit as the forward computed it).

import torch  # noqa: E402


def _np(t):
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _empty_like(x):  # the tests poison outputs here to catch elements a kernel leaves unwritten
    return torch.empty_like(x)


def _stats(n):
    """Two float64 statistics buffers of ``n``: numpy views and the tensors sharing them."""
    mean, var = np.empty(n), np.empty(n)
    return mean, var, torch.from_numpy(mean), torch.from_numpy(var)


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _grads(n, like):
    """Parameter-gradient buffers in ``like``'s dtype (numpy views and tensors)."""
    dt = _NUMPY[like.dtype]
    dw, db = np.empty(n, dt), np.empty(n, dt)
    return dw, db, torch.from_numpy(dw), torch.from_numpy(db)


_FILL: dict = {}


def _param(t, n, fill, like):
    """γ or β as a flat numpy view; ``None`` is a constant vector of ``fill`` (cached, read-only)."""
    if t is not None:
        a = _np(t)
        return a if a.ndim == 1 else a.reshape(-1)
    key = (n, fill, like.dtype)
    arr = _FILL.get(key)
    if arr is None:
        arr = _FILL[key] = np.full(n, fill, dtype=_NUMPY[like.dtype])
        arr.flags.writeable = False
    return arr


def rows_forward(x, weight, bias, eps: float, center: bool, groups: int, seg: int, out=None):
    """``x (R, D)`` → ``(y, mean, var)``; mean and biased var per row, float64."""
    R, D = x.shape
    P = groups * (D // seg)
    y = _empty_like(x) if out is None else out
    mean, var, tm, tv = _stats(R)
    w, b = _param(weight, P, 1.0, x), _param(bias, P, 0.0, x)
    if groups == 1 and seg == 1:
        _k_rows_forward_elem(_np(x), w, b, eps, center, _np(y), mean, var)
    else:
        _k_rows_forward_seg(_np(x), w, b, eps, center, groups, seg, _np(y), mean, var)
    return y, tm, tv


def rows_backward(dy, x, mean, var, weight, eps: float, center: bool, groups: int, seg: int, out=None):
    """``(dx, dweight, dbias)``; the parameter gradients flat, in x's dtype."""
    R, D = x.shape
    P = groups * (D // seg)
    dx = _empty_like(x) if out is None else out
    dw, db, tdw, tdb = _grads(P, x)
    w = _param(weight, P, 1.0, x)
    args = (_np(dy.contiguous()), _np(x), _np(mean), _np(var), w, eps, center)
    if groups == 1 and seg == 1:
        _k_rows_backward_elem(*args, _blocks(R), _np(dx), dw, db)
    else:
        _k_rows_backward_seg(*args, groups, seg, _blocks(R), _np(dx), dw, db)
    return dx, tdw, tdb


def channels_forward(x, weight, bias, eps: float, out=None):
    """BN training on ``x (N, C, S)`` → ``(y, mean, var)`` per channel, float64."""
    N, C, S = x.shape
    y = _empty_like(x) if out is None else out
    mean, var, tm, tv = _stats(C)
    w, b = _param(weight, C, 1.0, x), _param(bias, C, 0.0, x)
    if S > 1:
        _k_channels_forward(_np(x), w, b, eps, _np(y), mean, var)
    else:
        _k_columns_forward(_np(x)[:, :, 0], w, b, eps, _blocks(N), _np(y)[:, :, 0], mean, var)
    return y, tm, tv


def channels_backward(dy, x, mean, var, weight, eps: float, out=None):
    """BN training backward on ``(N, C, S)`` → ``(dx, dweight, dbias)`` per channel, in x's dtype."""
    N, C, S = x.shape
    dx = _empty_like(x) if out is None else out
    dw, db, tdw, tdb = _grads(C, x)
    w = _param(weight, C, 1.0, x)
    dyn, xn, dxn = _np(dy.contiguous()), _np(x), _np(dx)
    if S > 1:
        _k_channels_backward(dyn, xn, _np(mean), _np(var), w, eps, dxn, dw, db)
    else:
        _k_columns_backward(dyn[:, :, 0], xn[:, :, 0], _np(mean), _np(var), w, eps, _blocks(N), dxn[:, :, 0], dw, db)
    return dx, tdw, tdb


def channels_affine(x, mean, scale, shift, out=None):
    """BN eval on ``x (N, C, S)``: ``y = (x − mean)·scale + shift`` per channel (all ``(C,)``, x's dtype)."""
    return _affine(x, *(_np(t.contiguous()) for t in (mean, scale, shift)), out)


def _affine(x, m, a, h, out):
    N, C, S = x.shape
    y = _empty_like(x) if out is None else out
    if S > 1:
        _k_affine_ncs(_np(x), m, a, h, _np(y))
    else:
        _k_affine_mc(_np(x)[:, :, 0], m, a, h, _blocks(N), _np(y)[:, :, 0])
    return y


def channels_eval(x, mean, var, weight, bias, eps: float, out=None):
    """BatchNorm in eval on ``x (N, C, S)`` straight from the running statistics ``mean``,
    ``var`` (``(C,)``, x's dtype): ``(x − mean)·γ/√(var + ε) + β``, the map built in float64."""
    C = x.shape[1]
    m0, a0, h0 = (np.empty(C, _NUMPY[x.dtype]) for _ in range(3))
    _k_eval_coefficients(_np(mean).reshape(-1), _np(var).reshape(-1), _param(weight, C, 1.0, x),
                         _param(bias, C, 0.0, x), eps, m0, a0, h0)
    return _affine(x, m0, a0, h0, out)


def channels_affine_backward(dy, x, mean, scale, out=None):
    """Backward of :func:`channels_affine`: ``(dx, Σ dy·(x − mean), Σ dy)``, sums per channel."""
    N, C, S = x.shape
    dx = _empty_like(x) if out is None else out
    da, db, tda, tdb = _grads(C, x)
    m, a = _np(mean.contiguous()), _np(scale.contiguous())
    dyn, xn, dxn = _np(dy.contiguous()), _np(x), _np(dx)
    if S > 1:
        _k_affine_bwd_ncs(dyn, xn, m, a, dxn, da, db)
    else:
        _k_affine_bwd_mc(dyn[:, :, 0], xn[:, :, 0], m, a, _blocks(N), dxn[:, :, 0], da, db)
    return dx, tda, tdb


def groups_forward(x, weight, bias, eps: float, groups: int, out=None):
    """GroupNorm/InstanceNorm on channels_last ``x (N, S, C)`` → ``(y, mean, var)`` per (sample, group)."""
    N, S, C = x.shape
    y = _empty_like(x) if out is None else out
    mean, var, tm, tv = _stats(N * groups)
    w, b = _param(weight, C, 1.0, x), _param(bias, C, 0.0, x)
    _k_groups_forward(_np(x), w, b, eps, groups, _np(y), mean, var)
    return y, tm, tv


def groups_backward(dy, x, mean, var, weight, eps: float, groups: int, out=None):
    N, S, C = x.shape
    dx = _empty_like(x) if out is None else out
    dw, db, tdw, tdb = _grads(C, x)
    _k_groups_backward(_np(dy.contiguous()), _np(x), _np(mean.contiguous()), _np(var.contiguous()),
                       _param(weight, C, 1.0, x), eps, groups, _np(dx), dw, db)
    return dx, tdw, tdb
