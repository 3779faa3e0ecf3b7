"""What normlab adds to each call, on tensors too small for the kernel to matter.

    python benchmarks/overhead.py

For each method, forward and forward+backward, the fastest of ``--reps`` interleaved calls of
normlab and of torch's native op on a 4×64 (rows) or 2×64×2×2 (channels) float32 tensor. The
difference is the fixed per-call cost (checks, plan look-up, autograd Function, buffers, the
kernel launch) that a large tensor amortises. "warm" calls follow each other; "cold" calls each
follow a sum over 64 MB, which evicts the caches as the large ops between two norms of a
network do (Python's objects and code then come from memory). Timings are for reading, never
for a test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as TF

import normlab.functional as NF


def _fastest(fns: dict, reps: int, before=None) -> dict:
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: v * 1e6 for k, v in best.items()}


def cases(grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g).requires_grad_(grad)
    x4 = torch.randn(2, 64, 2, 2, generator=g).requires_grad_(grad)
    xcl = torch.randn(2, 64, 2, 2, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    w, c = torch.randn(64, generator=g).requires_grad_(grad), torch.randn(64, generator=g).requires_grad_(grad)
    rm, rv = torch.randn(64, generator=g), torch.rand(64, generator=g) + 1
    return {
        "layer_norm": lambda M: M.layer_norm(x, (64,), w, w),
        "rms_norm": lambda M: M.rms_norm(x, (64,), w),
        "batch_norm": lambda M: M.batch_norm(x4, None, None, c, c, True),
        "batch_norm_eval": lambda M: M.batch_norm(x4, rm, rv, c, c, False),
        "group_norm": lambda M: M.group_norm(x4, 32, c, c),
        "instance_norm": lambda M: M.instance_norm(x4, weight=c, bias=c),
        "batch_norm cl": lambda M: M.batch_norm(xcl, None, None, c, c, True),
        "group_norm cl": lambda M: M.group_norm(xcl, 32, c, c),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=400)
    reps = parser.parse_args().reps
    flush = torch.ones(16 * 2**20)  # 64 MB
    print(f"{'':25s} {'warm µs':^21s} {'cold µs':^21s}")
    print(f"{'method':16s} {'pass':8s} {'torch':>10s} {'normlab':>10s} {'torch':>10s} {'normlab':>10s}")
    for grad in (False, True):
        for name, op in cases(grad).items():
            run = (lambda M, op=op: op(M).sum().backward()) if grad else op
            fns = {"torch": lambda: run(TF), "normlab": lambda: run(NF)}
            warm, cold = _fastest(fns, reps), _fastest(fns, max(reps // 4, 1), flush.sum)
            print(f"{name:16s} {'fwd+bwd' if grad else 'fwd':8s} {warm['torch']:10.1f} {warm['normlab']:10.1f} "
                  f"{cold['torch']:10.1f} {cold['normlab']:10.1f}")


if __name__ == "__main__":
    main()
