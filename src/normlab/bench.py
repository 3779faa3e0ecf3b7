"""``normlab bench``: how close each normalization runs to the memory-bandwidth limit.

Normalization is memory-bound, so the yardstick is the compulsory traffic (DESIGN.md): forward
reads ``x`` and writes ``y`` (2 passes over x-sized data; BatchNorm in training 3, its statistics
need a read before the output can be written); backward reads ``x`` and ``dy`` and writes ``dx``
(3). Forward+backward is the sum. Each case is timed, in the same run and interleaved round by
round so the noise of a shared machine hits all alike, for:

* ``normlab`` — the default backend (a fused kernel where one applies);
* ``reference`` — normlab's reference path (plain torch ops and the written-out backward);
* ``torch`` — torch's native op;
* ``compiled`` — ``torch.compile`` of the reference path (skipped with ``--quick``);
* ``copy`` — ``x.clone()``, the bandwidth yardstick of this machine at this size.

``normlab bench`` first asks glibc's malloc to keep the memory it frees (no trimming, no
``mmap`` for blocks up to 32 MiB or more), as jemalloc and tcmalloc do: with glibc's defaults, whether a fresh
multi-MB output comes back page-faulted (a 16 MB LayerNorm forward then takes 3.6 ms instead of
0.8 ms) depends on the order of earlier frees, and hits torch and normlab at random from run to
run. ``--system-malloc`` measures with the defaults; the JSON's ``meta`` records which.

Reported per case: the median time, GB/s by the bytes model, % of the copy's GB/s, and the
speed-up of normlab over torch, over the reference and over the compiled reference (time of
the other / time of normlab: above 1 means normlab is faster). The speed-up over torch is the
median of the rounds' ratios with a 95% interval (:func:`speedup`) and a verdict: "faster" or
"slower" where the interval excludes 1, "par" where the difference is within the machine's noise.
Peak memory is reported on CUDA (``torch.cuda.max_memory_allocated`` above the inputs); the CPU
has no allocator counter.

>>> rows = run(quick=True, methods=["rms_norm"], shapes={"rms_norm": [(64, 128)]}, reps=3)
>>> sorted(rows[0]) == sorted(COLUMNS)
True
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import statistics
import sys
import textwrap
import time
from typing import Callable, Iterable

import torch

from ._extras import lab_message
import torch.nn.functional as TF

from . import functional as F
from .kernels import set_backend, use_backend

__all__ = ["run", "timed", "speedup", "verdict", "METHODS", "SHAPES", "COLUMNS", "main"]

ROWS_QUICK = [(256, 1024), (4096, 1024), (1000, 1000), (256, 4096), (8, 16, 16, 256, "p")]
ROWS_FULL = ROWS_QUICK + [(64, 768), (8192, 1024), (2048, 4096), (4096, 4096), (333, 2049)]
NCHW_QUICK = [(8, 64, 32, 32), (32, 64, 32, 32), (8, 256, 16, 16), (32, 64, 32, 32, "cl")]
NCHW_FULL = NCHW_QUICK + [(4, 32, 64, 64), (16, 128, 28, 28), (32, 256, 14, 14), (2, 48, 23, 31),
                          (8, 256, 16, 16, "cl"), (512, 256)]

# method -> (op(module, x, params) for module normlab.functional or torch.nn.functional,
#            extra forward passes in the bytes model, shape family)
METHODS: dict[str, tuple] = {
    "layer_norm": (lambda m, x, p: m.layer_norm(x, x.shape[-1:], p[0], p[1]), 0, "rows"),
    "rms_norm": (lambda m, x, p: m.rms_norm(x, x.shape[-1:], p[0]), 0, "rows"),
    "batch_norm": (lambda m, x, p: m.batch_norm(x, None, None, p[0], p[1], True), 1, "nchw"),
    "batch_norm_eval": (lambda m, x, p: m.batch_norm(x, p[2], p[3], p[0], p[1], False), 0, "nchw"),
    "group_norm": (lambda m, x, p: m.group_norm(x, 32 if x.shape[1] % 32 == 0 else 1, p[0], p[1]), 0, "nchw"),
    "instance_norm": (lambda m, x, p: m.instance_norm(x, weight=p[0], bias=p[1]), 0, "nchw"),
}
SHAPES = {"rows": (ROWS_QUICK, ROWS_FULL), "nchw": (NCHW_QUICK, NCHW_FULL)}
# the layouts beside contiguous: "p" a permuted view (rows), "cl" channels_last (N, C, ...)
_TAGS = {"rows": ("", "p"), "nchw": ("", "cl")}
COLUMNS = ["method", "shape", "dtype", "pass", "ms", "GB/s", "% copy", "vs torch", "vs torch low", "vs torch high",
           "verdict", "vs reference", "vs compiled", "peak MB", "copy GB/s"]


def timed(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
          before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``reps`` rounds after ``warmup`` calls each,
    interleaved round by round in an order that reverses every round (a drift in the machine's
    speed hits every candidate alike, and round ``i`` of each candidate ran side by side).
    ``before``, untimed, runs before every timed call, so that each candidate starts from the
    same state of the caches instead of from whatever the previous candidate left there (a
    candidate that follows the slow reference would start cold, and one that follows a copy of
    the input warm)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for i in range(reps):
        for k, fn in order if i % 2 == 0 else order[::-1]:
            if before is not None:
                before()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return times


def speedup(theirs: list[float], ours: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The speed-up ``theirs / ours`` as the median of the rounds' ratios (each round timed both
    side by side), with a distribution-free ``level`` confidence interval of that median (order
    statistics of the binomial: no assumption on the noise's shape). ``(median, low, high)``;
    the interval is the whole range when there are too few rounds for ``level``."""
    r = sorted(a / b for a, b in zip(theirs, ours))
    n = len(r)
    k, cdf = 0, 0.0  # largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2
    while True:
        cdf += math.comb(n, k) / 2**n
        if cdf > (1 - level) / 2:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(r), r[k - 1], r[n - k]


def verdict(low: float, high: float) -> str:
    """``"faster"`` or ``"slower"`` where the interval of a speed-up excludes 1, else ``"par"``
    (the difference is within the machine's noise at this many rounds)."""
    return "faster" if low > 1 else "slower" if high < 1 else "par"


def _inputs(method: str, shape: tuple, dtype, device):
    tag = shape[-1] if isinstance(shape[-1], str) else ""
    dims = shape[:-1] if tag else shape
    g = torch.Generator(device="cpu").manual_seed(0)
    if tag == "p":  # a permuted view: ConvNext's (N, H, W, C) of an (N, C, H, W) tensor
        x = (torch.randn(dims[0], dims[-1], *dims[1:-1], generator=g) * 2 + 1).to(device=device, dtype=dtype)
        x = x.permute(0, *range(2, x.dim()), 1)
    else:
        x = (torch.randn(dims, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    if tag == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    c = dims[-1] if METHODS[method][2] == "rows" else dims[1]
    params = [torch.randn(c, generator=g).to(device, dtype), torch.randn(c, generator=g).to(device, dtype),
              torch.randn(c, generator=g).to(device, dtype), torch.rand(c, generator=g).to(device, dtype) + 0.5]
    return x, params, ("×".join(map(str, dims)) + (f" {tag}" if tag else ""))


def _case(method, x, params, backward: bool):
    """Callables running ``method`` once (forward, or forward+backward) per candidate."""
    op = METHODS[method][0]
    dy = torch.randn_like(x) if backward else None
    leaves = [t.detach().clone().requires_grad_(backward) for t in params[:2]] + list(params[2:])
    xg = x.detach().clone().requires_grad_(backward)

    def make(mod, backend, compiled=False):
        fn = (lambda: op(mod, xg, leaves))
        if compiled:
            fn = torch.compile(fn, dynamic=False)
        # compiled code reads the process-wide backend (use_backend is per thread and invisible
        # to dynamo), so the backend is set for the whole process around each call
        scope = _process_backend if compiled else use_backend

        def call():
            with scope(backend):
                y = fn()
                if backward:
                    xg.grad = None
                    for t in leaves[:2]:
                        t.grad = None
                    y.backward(dy)
        return call

    return {
        "normlab": make(F, "auto"),
        "reference": make(F, "reference"),
        "torch": make(TF, "auto"),
        "compiled": make(F, "reference", compiled=True),
    }


@contextlib.contextmanager
def _process_backend(name: str):
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def run(quick: bool = True, methods: Iterable[str] | None = None, dtypes=(torch.float32,), device: str = "cpu",
        reps: int | None = None, compiled: bool | None = None, shapes: dict | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark rows (one dict per method × shape × dtype × pass, keys :data:`COLUMNS`)."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    reps = reps or (31 if quick else 51)
    compiled = (not quick) if compiled is None else compiled
    out = []
    for method in methods:
        family = METHODS[method][2]
        for shape in (shapes or {}).get(method) or SHAPES[family][0 if quick else 1]:
            tag = shape[-1] if isinstance(shape[-1], str) else ""
            if tag not in _TAGS[family] or (method == "instance_norm" and len(shape) < 3):
                continue
            for dtype in dtypes:
                x, params, label = _inputs(method, shape, dtype, device)
                size = x.numel() * x.element_size()
                for backward in (False, True):
                    if progress:
                        progress(f"{method} {label} {'fwd+bwd' if backward else 'fwd'}")
                    fns = _case(method, x, params, backward)
                    if not compiled:
                        fns.pop("compiled")
                    fns["copy"] = lambda: x.clone()  # timed in the same rounds as the candidates
                    # each call starts as in a network: its input just written by the layer before
                    times = timed(fns, reps, before=lambda: x.clone())
                    t = {k: statistics.median(v) for k, v in times.items()}
                    ratio, low, high = speedup(times["torch"], times["normlab"])
                    copy = t["copy"]
                    passes = 2 + METHODS[method][1] + (3 if backward else 0)
                    gbs = passes * size / t["normlab"] / 1e9
                    copy_gbs = 2 * size / copy / 1e9
                    out.append({
                        "method": method, "shape": label, "dtype": str(dtype).replace("torch.", ""),
                        "pass": "fwd+bwd" if backward else "fwd", "ms": t["normlab"] * 1e3, "GB/s": gbs,
                        "% copy": 100 * gbs / copy_gbs, "vs torch": ratio, "vs torch low": low,
                        "vs torch high": high, "verdict": verdict(low, high),
                        "vs reference": t["reference"] / t["normlab"],
                        "vs compiled": t["compiled"] / t["normlab"] if "compiled" in t else None,
                        "peak MB": _peak_mb(fns["normlab"]) if device == "cuda" else None,
                        "copy GB/s": copy_gbs,
                    })
    return out


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def summary(rows: list[dict]) -> dict:
    """Medians and minima of the speed-ups over torch, per pass and per method and pass (with how
    many shapes ran and on how many normlab was slower), for the closing lines and the README."""
    out: dict = {}
    for p in ("fwd", "fwd+bwd"):
        r = [row for row in rows if row["pass"] == p]
        if r:
            vs = [row["vs torch"] for row in r]
            out[p] = {"median vs torch": statistics.median(vs), "min vs torch": min(vs),
                      "median % copy": statistics.median(row["% copy"] for row in r)}
    per: dict[str, list[dict]] = {}
    for row in rows:
        per.setdefault(f"{row['method']} {row['pass']}", []).append(row)
    out["per method"] = {
        k: {"min": min(r["vs torch"] for r in v), "median": statistics.median(r["vs torch"] for r in v),
            "shapes": len(v), **{w: sum(r["verdict"] == w for r in v) for w in ("faster", "par", "slower")}}
        for k, v in per.items()}
    return out


_CAPTION = ("× torch: torch's own op (torch.nn.functional) on the same tensors, timed in the same rounds: the "
            "median of the rounds' ratios, and its 95% interval (distribution-free: where it holds 1, the two are "
            "on par). "
            "× ref., × compiled: normlab's plain-torch reference, eager and torch.compile-d. "
            "Each is the other's time / normlab's: > 1 means normlab is faster. "
            "% copy: bandwidth reached, against x.clone() on this machine. --json keeps every column.")
_LEFT = ("method", "shape", "dtype", "pass")
# the printed columns (header: row key); a column with no value in any row is left out
_SHOWN = {"method": "method", "shape": "shape", "dtype": "dtype", "pass": "pass", "ms": "ms", "% copy": "% copy",
          "× torch": "vs torch", "95% CI": "vs torch low", "× ref.": "vs reference",
          "× compiled": "vs compiled", "peak MB": "peak MB"}


def _shown(rows: list[dict]) -> dict[str, str]:
    return {h: k for h, k in _SHOWN.items() if any(r[k] is not None for r in rows)}


def _table(rows: list[dict]):
    from rich.table import Table

    shown = _shown(rows)
    table = Table(caption=_CAPTION, caption_justify="left")
    for head in shown:
        table.add_column(head, justify="left" if head in _LEFT else "right")
    for row in rows:
        table.add_row(*[_cell(row, k) for k in shown.values()])
    return table


def _text_table(rows: list[dict]) -> str:
    """The same table as plain text, where ``rich`` (the lab extra) is not installed."""
    shown = _shown(rows)
    cells = [list(shown)] + [[_cell(row, k) for k in shown.values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join(["  ".join(v.ljust(w) if c in _LEFT else v.rjust(w) for v, w, c in zip(line, widths, shown))
                      for line in cells] + [textwrap.fill(_CAPTION, 100)])


class _PlainConsole:
    """What ``bench`` uses of ``rich.console.Console``, for a machine without ``rich``."""

    @contextlib.contextmanager
    def status(self, text: str):
        print(text + " ...", file=sys.stderr, flush=True)
        yield self

    def update(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def print(self, text) -> None:
        print(text, file=sys.stderr)


def _cell(row: dict, key: str) -> str:
    if key == "vs torch low":  # the interval in one cell
        return f"{row[key]:.2f}-{row['vs torch high']:.2f}"
    return _fmt(row[key])


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def plot(rows: list[dict], path: str) -> None:
    """Speed-up over torch per case (bars), one panel per pass; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    fig = Figure(figsize=(max(6, 0.35 * len(rows)), 4 * len(passes)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, p in zip(fig.subplots(len(passes), 1, squeeze=False)[:, 0], passes):
        r = [row for row in rows if row["pass"] == p]
        mid = [row["vs torch"] for row in r]
        err = [[m - row["vs torch low"] for m, row in zip(mid, r)],
               [row["vs torch high"] - m for m, row in zip(mid, r)]]
        colors = {"faster": "C2", "par": "0.6", "slower": "C3"}
        ax.bar(range(len(r)), mid, yerr=err, capsize=2, color=[colors[row["verdict"]] for row in r])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(r)), [f"{row['method']} {row['shape']}" for row in r], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs torch")
        ax.set_title(f"{p}: normlab vs torch native (> 1: normlab faster; bars: 95% interval, grey: within noise)")
    fig.savefig(path, dpi=90)


def _retain_freed_memory() -> bool:
    """glibc's ``mallopt``: no trimming below 1 GiB, no ``mmap`` below 1 GiB (32 MiB where glibc
    caps it). Process-wide; ``True`` if either setting took (``False`` off glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap = bool(mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20))
    return bool(mallopt(m_trim_threshold, 1 << 30)) or mmap


def _models(args, console, malloc: str) -> int:
    from . import bench_models

    try:
        with console.status("benchmarking models") as status:
            rows = []
            for dtype in args.dtype:
                rows += bench_models.run(args.models or None, compile=args.compile, dtype=getattr(torch, dtype),
                                         progress=lambda s: status.update(f"benchmarking {s} {dtype}"))
    except ValueError as e:
        console.print(f"normlab bench: {e}")
        return 2
    print(bench_models.table(rows))
    worst = min(rows, key=lambda r: r["speed-up"])
    count = {w: sum(r["verdict"] == w for r in rows) for w in ("faster", "par", "slower")}
    print(f"slowest relative to torch.nn: {worst['model']} {worst['size']} {worst['step']} "
          f"at {worst['speed-up']:.2f}× "
          f"({worst['low']:.2f}–{worst['high']:.2f}); median {statistics.median(r['speed-up'] for r in rows):.2f}×; "
          f"of {len(rows)} rows faster on {count['faster']}, on par on {count['par']}, slower on {count['slower']}; "
          f"malloc: {malloc}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "compiled": args.compile,
                "malloc": malloc, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


def main(args) -> int:
    """Entry point of ``normlab bench`` (arguments parsed by :mod:`normlab.cli`)."""
    try:
        from rich.console import Console
    except ImportError:  # the library and the bench need no extra: plain text instead
        Console = None
    if args.plot and (why := lab_message("bench --plot", ("matplotlib",))):
        print(why, file=sys.stderr)
        return 2
    console = Console(stderr=True) if Console else _PlainConsole()
    dtypes = [getattr(torch, d) for d in args.dtype]
    malloc = "system" if args.system_malloc or not _retain_freed_memory() else "retain freed memory"
    if getattr(args, "models", None) is not None:
        return _models(args, console, malloc)
    try:
        with console.status("benchmarking") as status:
            rows = run(quick=args.quick, methods=args.methods or None, dtypes=dtypes, device=args.device,
                       compiled=False if args.no_compile else None,
                       progress=lambda s: status.update(f"benchmarking {s}"))
    except ValueError as e:
        console.print(f"normlab bench: {e}")
        return 2
    if Console is None:
        print(_text_table(rows))
    else:
        out = Console()
        if not out.is_terminal:  # a file or a pipe: do not squeeze the table into 80 columns
            out = Console(width=120)
        out.print(_table(rows))
    s = summary(rows)
    for p in ("fwd", "fwd+bwd"):
        if p in s:
            v = s[p]
            print(f"{p}: median speed-up vs torch {v['median vs torch']:.2f}×, minimum {v['min vs torch']:.2f}×, "
                  f"median {v['median % copy']:.0f}% of copy bandwidth")
    print("per method and pass, normlab against torch's own op:")
    for k, v in s["per method"].items():
        print(f"  {k:<24} median {v['median']:.2f}×  min {v['min']:.2f}×  shapes: {v['faster']} faster, "
              f"{v['par']} on par, {v['slower']} slower")
    print(f"malloc: {malloc}" + (" (glibc mallopt; --system-malloc for the defaults)" if malloc != "system" else ""))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "quick": args.quick, "malloc": malloc, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "summary": s, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0
