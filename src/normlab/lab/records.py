"""The plain-data records every experiment returns, and the helpers that build them.

An experiment returns one JSON-able ``dict`` (a *record*); the report renders records and
nothing else, so ``normlab report DIR`` rebuilds the page from ``records.json`` alone.

Record::

    {
      "name": "zscore",                       # registry name: letters, digits, _ . - (file names)
      "title": "Raw vs Z-Score inputs",       # one line
      "source": "Lesson 14.1 §2",                # where the claim comes from
      "claim": "Z-Score inputs converge faster ...",   # the claim under test, in words
      "params": {"epochs": 5, "seeds": [0, 1], ...},   # what was run (JSON scalars/lists)
      "checks": [check, ...],                 # the numbers behind the verdict
      "verdict": {"supported": true | false, "summary": "3/3 checks hold: ..."},
      "figures": [figure, ...],
      "tables": [table, ...],
      "notes": ["free text, e.g. why a check may fail in quick mode"],
      "seconds": 12.3,                        # wall time of the experiment
    }

check  = {"name": str, "value": float, "op": ">" | "<" | ">=" | "<=", "threshold": float,
          "passed": bool, "detail": str}
table  = {"title": str, "columns": [str, ...], "rows": [[scalar, ...], ...]}
figure = {"title": str, "panels": [panel, ...]}   # panels side by side (wrapped at 3 per row)

panel kinds (every panel has "kind", "title", "xlabel", "ylabel"; optional "logy": bool):

- ``"lines"``: ``"series": [{"label", "x": [...], "y": [...], "lo": [...]?, "hi": [...]?}]`` —
  curves; when ``lo``/``hi`` are given the band between them is shaded (mean ± std, percentiles);
  optional ``"logx": true`` puts x on a base-2 log scale ticked at the data (batch sizes).
- ``"boxes"``: ``"boxes": [{"label", "whislo", "q1", "med", "q3", "whishi"}]`` — box plots from
  summary statistics (matplotlib ``bxp``), e.g. one box per layer; ``"group"`` (optional str per
  box) colours boxes of the same group alike.
- ``"bars"``: ``"labels": [...], "values": [...], "errors": [...]?`` — one bar per label.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

__all__ = ["check", "verdict", "box", "series", "panel", "figure", "table", "to_json"]

_OPS = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def check(name: str, value: float, op: str, threshold: float, detail: str = "") -> dict:
    """One computed test ``value op threshold``; NaN never passes."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    value = float(value)
    passed = (not math.isnan(value)) and bool(_OPS[op](value, threshold))
    return {"name": name, "value": value, "op": op, "threshold": float(threshold), "passed": passed, "detail": detail}


def verdict(checks: Sequence[dict]) -> dict:
    """The claim is supported when every check passes; the summary names the ones that fail."""
    failed = [c for c in checks if not c["passed"]]
    n = len(checks)
    if not n:
        return {"supported": False, "summary": "no checks were computed"}
    if not failed:
        return {"supported": True, "summary": f"all {n} checks hold"}
    names = "; ".join(f"{c['name']} ({_fmt(c['value'])} {c['op']} {_fmt(c['threshold'])} is false)" for c in failed)
    return {"supported": False, "summary": f"{n - len(failed)}/{n} checks hold; failing: {names}"}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def box(label: str, values, group: str | None = None, whiskers: tuple[float, float] = (5.0, 95.0)) -> dict:
    """Summary statistics for one box: median, quartiles, and whiskers at the given percentiles."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        nan = float("nan")
        out = {"label": label, "whislo": nan, "q1": nan, "med": nan, "q3": nan, "whishi": nan}
    else:
        q = torch.tensor([whiskers[0], 25.0, 50.0, 75.0, whiskers[1]], dtype=torch.float64) / 100
        lo, q1, med, q3, hi = torch.quantile(v, q).tolist()
        out = {"label": label, "whislo": lo, "q1": q1, "med": med, "q3": q3, "whishi": hi}
    if group is not None:
        out["group"] = group
    return out


def series(label: str, x: Iterable, y: Iterable, lo: Iterable | None = None, hi: Iterable | None = None) -> dict:
    """One curve of a ``"lines"`` panel, optionally with a shaded band ``lo..hi``."""
    out = {"label": label, "x": _floats(x), "y": _floats(y)}
    if (lo is None) != (hi is None):
        raise ValueError(f"series {label!r}: give both lo and hi for a band, or neither")
    if lo is not None:
        out["lo"], out["hi"] = _floats(lo), _floats(hi)
    lengths = {k: len(v) for k, v in out.items() if k != "label"}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"series {label!r}: x, y, lo and hi must have one length each, got {lengths}")
    return out


def panel(kind: str, title: str, xlabel: str = "", ylabel: str = "", logy: bool = False, **data: Any) -> dict:
    """One plot: ``kind`` is ``"lines"`` (``series=``), ``"boxes"`` (``boxes=``) or ``"bars"``
    (``labels=``, ``values=``, optional ``errors=``)."""
    if kind not in ("lines", "boxes", "bars"):
        raise ValueError(f"panel kind must be 'lines', 'boxes' or 'bars', got {kind!r}")
    return {"kind": kind, "title": title, "xlabel": xlabel, "ylabel": ylabel, "logy": logy, **data}


def figure(title: str, *panels: dict) -> dict:
    """Panels side by side under one title; one PNG in the report."""
    return {"title": title, "panels": list(panels)}


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence]) -> dict:
    """A table of the report, also written as a CSV."""
    return {"title": title, "columns": list(columns), "rows": [[to_json(c) for c in r] for r in rows]}


def _floats(xs: Iterable) -> list[float]:
    if isinstance(xs, torch.Tensor):
        return [float(v) for v in xs.detach().flatten().tolist()]
    return [float(v) for v in xs]


def to_json(obj: Any) -> Any:
    """Tensors, numpy scalars and tuples to plain JSON types; non-finite floats stay floats
    (``json`` writes them as NaN/Infinity, which Python reads back)."""
    if isinstance(obj, torch.Tensor):
        return to_json(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array or scalar
        return to_json(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
