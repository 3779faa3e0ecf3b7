"""First timing of normlab's reference path against torch's native ops (CPU, fp32).

Prints, per op and shape, the median time of forward and of forward+backward for both, and
their ratio (normlab / torch; < 3 is the target for the reference path). A copy of the same
size is timed in the same run for scale. Usage: ``python benchmarks/reference_vs_torch.py``.
The full benchmark suite arrives as ``normlab bench``.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as TF

import normlab.functional as F


def median_time(fn, reps=15, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cases():
    for n, d in ((4096, 1024), (256, 4096)):
        w, b = torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True)
        yield "layer_norm", (n, d), lambda m, x, w=w, b=b, d=d: m.layer_norm(x, (d,), w, b)
        yield "rms_norm", (n, d), lambda m, x, w=w, d=d: m.rms_norm(x, (d,), w)
    for shape in ((32, 64, 32, 32), (8, 256, 16, 16)):
        c = shape[1]
        w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        yield "batch_norm", shape, lambda m, x, w=w, b=b: m.batch_norm(x, None, None, w, b, True)
        yield "batch_norm_eval", shape, lambda m, x, w=w, b=b, c=c: m.batch_norm(x, torch.zeros(c), torch.ones(c), w, b, False)
        yield "group_norm", shape, lambda m, x, w=w, b=b: m.group_norm(x, 32, w, b)
        yield "instance_norm", shape, lambda m, x, w=w, b=b: m.instance_norm(x, weight=w, bias=b)


def main():
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'op':<16}{'shape':<20}{'copy ms':>9}{'fwd ms':>9}{'torch':>9}{'ratio':>7}{'f+b ms':>9}{'torch':>9}{'ratio':>7}")
    ratios = []
    for name, shape, op in cases():
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        t_copy = median_time(lambda: x.detach().clone())
        row = []
        for mod in (F, TF):
            with torch.no_grad():
                fwd = median_time(lambda: op(mod, x))
            fb = median_time(lambda: op(mod, x).backward(dy))
            row.append((fwd, fb))
        (f0, b0), (f1, b1) = row
        ratios.append(b0 / b1)
        print(f"{name:<16}{str(shape):<20}{t_copy*1e3:9.2f}{f0*1e3:9.2f}{f1*1e3:9.2f}{f0/f1:7.2f}{b0*1e3:9.2f}{b1*1e3:9.2f}{b0/b1:7.2f}")
    print(f"fwd+bwd ratio normlab/torch: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
