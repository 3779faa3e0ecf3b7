"""The ``normlab`` command line (also ``python -m normlab``).

* ``normlab run [NAME ...] [--out DIR] [--full] [--seeds K] [--epochs N] [--device cpu|cuda] [--nproc K]`` —
  run experiments of the lab (all of them, quick, when no name is given: the tour) and write the
  report to ``DIR/index.html`` (default ``normlab-report``).
* ``normlab bench [METHOD ...] [--quick] [--json FILE] [--plot FILE]`` — time every norm against
  torch's native op, the reference path and a same-size copy (see :mod:`normlab.bench`).
* ``normlab list`` — the experiments, and the layers, ops, scalers and tools normlab provides.
* ``normlab report DIR`` — rebuild the page from ``DIR/records.json``.
* ``normlab build [--force]`` — compile the C++ core now (otherwise the first use does, once).
* ``normlab info`` — torch, the C++ core (loaded, or why not), its path, compiler and backend.

User experiments (registered with :func:`normlab.lab.experiments.experiment`) run with
``normlab run --import MODULE NAME``.

Exit codes: 0 success (whatever the verdicts: a claim that does not hold is a result, not an
error), 1 an experiment raised (or ``build`` failed), 2 bad usage (unknown name, bad option, missing records, or
``run``/``report`` without the lab extra: ``pip install 'normlab[lab]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


def _plain(text: str) -> str:
    """The first line of a docstring as plain text: reST roles and literals unwrapped."""
    import re

    line = text.strip().splitlines()[0] if text and text.strip() else ""
    line = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", line)  # :class:`normlab.nn.X` -> X
    line = re.sub(r"``(.*?)``", r"\1", line)
    return line.replace("\\*", "*").replace("\\", "")


def _catalogue() -> list[tuple[str, list[tuple[str, str]]]]:
    from . import convert, diagnostics, distributed, functional, nn, preprocessing

    sections = []
    for mod in (nn, functional, preprocessing, convert, diagnostics, distributed):
        names = [n for n in mod.__all__ if callable(getattr(mod, n)) and not n.startswith("_")]
        sections.append((mod.__name__, [(n, _plain(getattr(mod, n).__doc__)) for n in names]))
    return sections


def _experiments():
    from .lab import experiments

    return experiments


def _list(_args: argparse.Namespace) -> int:
    exps = _experiments().EXPERIMENTS
    sections = [("experiments (normlab run NAME; random seeds and epochs of the tour, --full in brackets)",
                 [(e.name, f"{_plain(e.title)}{_runs(e)}") for e in exps.values()]), *_catalogue()]
    for title, rows in sections:
        print(title)
        width = max(len(name) for name, _ in rows)
        for name, summary in rows:
            print(f"  {name:<{width}}  {summary}")
    return 0


def _runs(e) -> str:
    """" — 5 seeds [10], 20 epochs [40]": what an experiment runs, as its registration says."""
    said = [f"{q} {what}" + (f" [{f}]" if f != q else "") for what, pair in (("seeds", e.seeds), ("epochs", e.epochs))
            if pair for q, f in [pair]]
    return " — " + ", ".join(said) if said else " — exact, no random seeds"


class _Lazy:
    """A help text part computed only when ``--help`` prints it (argparse formats help with ``%``)."""

    def __init__(self, fn: Callable[[], str]):
        self.fn = fn

    def __str__(self) -> str:
        return self.fn()


def _span(counts: list[int], dash: str = "-") -> str:
    """``"20"``, or ``"3-5"`` where the experiments differ."""
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}{dash}{hi}"


def _seed_range() -> str:
    """How many random seeds the experiments run, quick and with --full, from the registry."""
    try:
        exps = [e for e in _experiments().EXPERIMENTS.values() if e.seeds]
    except ImportError:  # the lab extra is missing: `normlab list` says so
        return "see normlab list"
    span = [_span([e.seeds[i] for e in exps]) for i in (0, 1)]
    return f"{span[0]}, or {span[1]} with --full"


def _lab_missing(command: str, modules: tuple[str, ...] | None = None) -> bool:
    """Print the one line that says how to get the lab extra (``modules``: all of it), if missing."""
    from ._extras import LAB, lab_message

    why = lab_message(command, modules or LAB)
    if why:
        print(why, file=sys.stderr)
    return why is not None


def _run(args: argparse.Namespace) -> int:
    if _lab_missing("run"):
        return 2
    import platform
    import time
    import traceback

    import torch

    from . import __version__
    from .lab import report

    import importlib

    if args.imports and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: modules in the working directory are found
    for module in args.imports:  # user experiments register themselves on import
        try:
            importlib.import_module(module)
        except ImportError as e:
            print(f"normlab run: --import {module} failed ({e}); run from its directory or add it to PYTHONPATH", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - the module's own error, in one line
            print(f"normlab run: --import {module} raised {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    E = _experiments()
    names = list(dict.fromkeys(args.names)) or list(E.TOUR)
    unknown = [n for n in names if n not in E.EXPERIMENTS]
    if unknown:
        print(f"normlab run: unknown experiment(s) {', '.join(unknown)}; valid names: {', '.join(E.EXPERIMENTS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("normlab run: --device cuda was asked for but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr)
        return 2
    try:  # before anything runs: a folder that cannot take the report is found now, not after an hour
        out = report.check_out(args.out, force=args.force)
    except ValueError as e:
        print(f"normlab run: --out: {e}", file=sys.stderr)
        return 2
    cfg = E.Config(full=args.full, seeds=tuple(range(args.seeds)) if args.seeds else None, epochs=args.epochs,
                   device=args.device, progress=None if not args.quiet else False, nproc=args.nproc)
    records, failed, start = [], [], time.perf_counter()
    meta = {
        "normlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "command": "normlab run " + " ".join(args.argv), "mode": "full" if args.full else "quick (tour)",
        "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {E.EXPERIMENTS[name].title} ...", flush=True)
        try:
            rec = E.run(name, cfg)
        except Exception:  # one broken experiment must not cost the others their report
            failed.append(name)
            traceback.print_exc()
            continue
        records.append(rec)
        print(f"      {rec['verdict']['status']} ({rec['seconds']:.1f} s): {rec['verdict']['summary']}", flush=True)
        try:  # kept as soon as it is known: an error or an interrupt later loses nothing
            report.write_report([rec], out, meta=meta, page=False, force=args.force)
        except (OSError, ValueError) as e:
            print(f"normlab run: could not save {name}'s record into {out}: {e}", file=sys.stderr)
            return 1
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if records:
        page = report.write_report(records, out, meta=meta, force=args.force)
        count = {k: sum(r["verdict"]["status"] == k for r in records) for k in ("supported", "not supported", "inconclusive")}
        from .lab.claims import CLAIMS, decide

        by_name = {r["name"]: r for r in records}
        claims = [decide(c, by_name)["status"] for c in CLAIMS]
        told = {k: claims.count(k) for k in dict.fromkeys(claims)}
        print(", ".join(f"{n} {k}" for k, n in count.items()) + f" (of {len(records)} experiments); the texts' "
              f"{len(CLAIMS)} claims: " + ", ".join(f"{n} {k}" for k, n in told.items()) + f"; report: {page}")
    if failed:
        print(f"normlab run: experiment(s) failed with an error: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    if _lab_missing("report", ("matplotlib",)):
        return 2
    from .lab import report

    try:
        page = report.rebuild(args.dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"normlab report: {e}", file=sys.stderr)
        return 2
    print(f"report: {page}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .kernels import build

    try:
        path = build.prebuild(force=args.force)
    except Exception as e:  # noqa: BLE001 - the compiler's whole message, then exit 1
        print(f"normlab build: the C++ core could not be built:\n{e}", file=sys.stderr)
        return 1
    print(f"normlab build: the C++ core is ready: {path}")
    return 0


def _info(_args: argparse.Namespace) -> int:
    from . import __version__
    from .kernels import build

    rows = {"normlab": __version__, **build.info()}
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: exact, fast normalization layers for PyTorch, and a lab of experiments.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run experiments of the lab and write a report (no names: the quick tour)")
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (see `normlab list`); default: all, quick")
    p.add_argument("--out", default="normlab-report",
                   help="report folder (default: normlab-report); a report already there is added to")
    p.add_argument("--force", action="store_true",
                   help="write the report into a folder that holds other files too (never needed for a new one)")
    p.add_argument("--full", action="store_true", help="full versions: more epochs and seeds (tens of minutes on 2 CPU cores)")
    p.add_argument("--seeds", type=_positive, metavar="K",
                   help="run seeds 0..K-1 (default: each experiment's own, `normlab list` shows them: "
                        "%(own)s)").own = _Lazy(_seed_range)
    p.add_argument("--epochs", type=_positive, metavar="N", help="override every experiment's number of epochs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    p.add_argument("--nproc", type=_positive, default=1, metavar="K",
                   help="also train data-parallel on K processes (gloo): batch-size gains a SyncBatchNorm row")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, so the experiments it registers can be run (repeatable)")
    p.set_defaults(func=_run)
    p = sub.add_parser("bench", help="time every norm against torch native, the reference and a copy (GB/s)")
    p.add_argument("methods", nargs="*", metavar="METHOD", help="layer_norm, rms_norm, batch_norm, batch_norm_eval, "
                   "group_norm, instance_norm (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions, no torch.compile (< 1 min on 2 CPU cores)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--json", metavar="FILE", help="write every row and a summary as JSON")
    p.add_argument("--plot", metavar="FILE", help="write the speed-ups vs torch as a PNG")
    p.add_argument("--models", nargs="*", metavar="MODEL",
                   help="time train steps and eval of real models (transformers: gpt2, bert, llama, qwen2, resnet, "
                        "convnext; timm-efficientnet, timm-convnext, timm-vit; diffusers-unet; default: all whose "
                        "library is installed) as written and after to_normlab, in each --dtype (needs normlab[bench])")
    p.add_argument("--compile", action="store_true", help="with --models: compare the torch.compile-d models")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's malloc defaults (by default the bench asks it to retain freed memory, "
                        "so that outputs do not page-fault back in at random)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("list", help="list the experiments, and the layers, ops, scalers and tools normlab provides")
    p.set_defaults(func=_list)
    p = sub.add_parser("report", help="rebuild DIR/index.html from DIR/records.json")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_report)
    p = sub.add_parser("build", help="compile the C++ core now (for images and CI; otherwise it builds at first use)")
    p.add_argument("--force", action="store_true", help="build anew even where an intact one is cached")
    p.set_defaults(func=_build)
    p = sub.add_parser("info", help="what normlab runs on: torch, the C++ core (or why not), compiler, backend")
    p.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `normlab list | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
