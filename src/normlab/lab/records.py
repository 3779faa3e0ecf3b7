"""The plain-data records every experiment returns, and the helpers that build them.

An experiment returns one JSON-able ``dict`` (a *record*); the report renders records and
nothing else, so ``normlab report DIR`` rebuilds the page from ``records.json`` alone.

Record::

    {
      "name": "zscore",                       # registry name: letters, digits, _ . - (file names)
      "title": "Raw vs Z-Score inputs",       # one line
      "source": "Lesson 14.1 §2",                # where the claim comes from
      "claim": "Z-Score inputs converge faster ...",   # the claim under test, in words
      "params": {"epochs": 5, "random seeds": [0, 1], ...},   # what was run (JSON scalars/lists)
      "checks": [check, ...],                 # the numbers behind the verdict
      "verdict": {"status": "supported" | "not supported" | "inconclusive", "summary": "why, in words"},
      "figures": [figure, ...],
      "tables": [table, ...],
      "notes": ["free text, e.g. why a check may fail in quick mode"],
      "seconds": 12.3,                        # wall time of the experiment
    }

check  = {"name": str, "value": float, "values": [float per random seed] | None (exact),
          "ci": [lo, hi], "ci_method": str, "op": ">" | "<" | ">=" | "<=", "threshold": float,
          "status": "holds" | "fails" | "undecided", "passed": bool (status == "holds"), "detail": str,
          "margin": float (optional: the smallest effect that matters, see check)}
table  = {"title": str, "columns": [str, ...], "rows": [[scalar, ...], ...]}
figure = {"title": str, "panels": [panel, ...],   # panels side by side (wrapped at 3 per row)
          "caption": str, "sharey": bool}           # what to see in it; one y axis for all panels

panel kinds (every panel has "kind", "title", "xlabel", "ylabel"; optional "logy": bool):

- ``"lines"``: ``"series": [{"label", "x": [...], "y": [...], "lo": [...]?, "hi": [...]?}]`` —
  curves; when ``lo``/``hi`` are given the band between them is shaded (mean ± std, percentiles);
  optional ``"logx": true`` puts x on a base-2 log scale ticked at the data (batch sizes).
- ``"points"``: ``"series"`` as for lines, each drawn as dots (a scatter of a data set).
- ``"boxes"``: ``"boxes": [{"label", "whislo", "q1", "med", "q3", "whishi"}]`` — box plots from
  summary statistics (matplotlib ``bxp``), e.g. one box per layer; ``"group"`` (optional str per
  box) colours boxes of the same group alike.
- ``"bars"``: ``"labels": [...], "values": [...], "errors": [...]?`` — one bar per label.

Any panel may carry ``"refs": [{"y": number, "label": str}]``: reference levels (a threshold, a
rounding unit) drawn as labelled dashed lines.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

import torch

__all__ = ["check", "verdict", "explain", "box", "series", "panel", "figure", "table", "to_json", "validate",
           "problem"]

VERDICTS = ("supported", "not supported", "inconclusive")
STATUSES = ("holds", "fails", "undecided")
_REQUIRED = ("name", "title", "claim", "checks", "verdict")
_NAME = re.compile(r"[\w.-]+\Z")  # a record's name becomes a file name and an HTML id

_OPS = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def check(name: str, value, op: str, threshold: float, detail: str = "",
          within: tuple[float, float] | None = None, margin: float = 0.0) -> dict:
    """One claim about a number, ``value op threshold``, decided with its uncertainty.

    ``value`` is either one number from a computation without randomness (its interval is the
    value itself) or a sequence with one number per random seed. For several seeds the value is
    their mean and ``ci`` the 95% t-interval of that mean (``mean ± t₀.₉₇₅,ₙ₋₁·s/√n``, ``s`` the
    sample standard deviation over seeds). The check **holds** when the whole interval is on
    the claimed side of the threshold, **fails** when the whole interval is on the other side,
    and is **undecided** otherwise (one seed gives no interval: undecided). A NaN (a run that
    diverged) fails; an infinite value (a gradient that vanished in a log ratio) is judged seed
    by seed, the interval then being the range of the values. ``within=(lo, hi)`` is the range
    the quantity can take (a difference of accuracies: ``(-1, 1)``); a t-interval that reaches
    past it is cut to it, and the method says so.

    ``margin`` is the smallest effect that matters, in the value's units: a difference within
    ``threshold ± margin`` has no practical effect. With a margin the claimed effect must clear it:
    the check **holds** when the whole interval lies beyond ``threshold ± margin`` on the claimed
    side, and **fails** when the whole interval lies short of it — on the other side of the
    threshold, or inside the margin (no practical effect, a decision, not a lack of seeds).
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"check {name!r}: margin must be a finite number >= 0, got {margin!r}")
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not isinstance(value, (int, float)) and not hasattr(value, "__len__") and hasattr(value, "__iter__"):
        value = list(value)  # a generator of per-seed values
    per_seed = isinstance(value, (list, tuple)) or (not isinstance(value, str) and np.ndim(value) >= 1)
    values = [float(v) for v in value] if per_seed else [float(value)]
    if not values:
        raise ValueError(f"check {name!r} got no values")
    good = _OPS[op]
    if margin:  # the claimed effect must clear the margin: judge against the margin's edge
        edge = threshold + margin if op in (">", ">=") else threshold - margin
        good = (lambda a, b, g=_OPS[op]: g(a, edge))
    mean = sum(values) / len(values)  # inf where a seed's value is infinite
    if any(math.isnan(v) for v in values):
        lo = hi = math.nan
        method, status = "a run diverged (NaN)", "fails"
    elif not per_seed:
        lo = hi = values[0]
        method, status = "exact (no randomness)", "holds" if good(values[0], threshold) else "fails"
    elif not all(math.isfinite(v) for v in values):
        lo, hi = min(values), max(values)
        method = f"range over {len(values)} random seeds (a value is infinite)"
        status = ("holds" if all(good(v, threshold) for v in values)
                  else "fails" if not any(good(v, threshold) for v in values) else "undecided")
    elif len(values) < 2:
        lo = hi = math.nan
        method, status = "one random seed: no interval", "undecided"
    elif max(values) == min(values):  # every seed gave the same number: more seeds cannot move it
        lo = hi = values[0]
        method = f"the same value in all {len(values)} random seeds"
        status = "holds" if good(values[0], threshold) else "fails"
    else:
        lo, hi = _t_interval(values)
        method = f"95% t-interval over {len(values)} random seeds"
        if within is not None and (lo < within[0] or hi > within[1]):  # the quantity cannot go past its range
            lo, hi = max(lo, within[0]), min(hi, within[1])
            method += f", cut to the possible range [{within[0]:g}, {within[1]:g}]"
        line = edge if margin else threshold
        status = ("holds" if good(lo, threshold) and good(hi, threshold)
                  else "fails" if not good(lo, threshold) and not good(hi, threshold) and lo != line
                  and hi != line else "undecided")
    out = {"name": name, "value": mean, "values": values if per_seed else None, "ci": [lo, hi], "ci_method": method,
           "op": op, "threshold": float(threshold), "status": status, "passed": status == "holds", "detail": detail}
    if margin:
        out["margin"] = float(margin)
    return out


def _t_interval(values: Sequence[float]) -> tuple[float, float]:
    from scipy.stats import t

    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def verdict(checks: Sequence[dict], hint: str = "") -> dict:
    """The experiment's verdict from its checks, with the reason in words.

    ``"supported"`` when every check holds, ``"not supported"`` when any check fails (its whole
    interval is on the wrong side), ``"inconclusive"`` otherwise: some interval still contains
    its threshold. ``hint`` (e.g. how to run more seeds) is added to an inconclusive reason.
    """
    n = len(checks)
    if not n:
        return {"status": "inconclusive", "summary": "no checks were computed"}
    failing = [c for c in checks if c["status"] == "fails"]
    open_ = [c for c in checks if c["status"] == "undecided"]
    if failing:
        return {"status": "not supported",
                "summary": f"{len(failing)} of {n} checks fail: " + "; ".join(explain(c) for c in failing)}
    if open_:
        text = f"{len(open_)} of {n} checks undecided: " + "; ".join(explain(c) for c in open_)
        return {"status": "inconclusive", "summary": text + (f". {hint}" if hint else "")}
    return {"status": "supported", "summary": f"all {n} checks hold, each interval on the claimed side"}


def explain(c: dict) -> str:
    """One check in words: its value, its interval and what that says about the claim."""
    side = {">": "above", ">=": "at or above", "<": "below", "<=": "at or below"}[c["op"]]
    lo, hi = c["ci"]
    if c["values"] is None:
        where = f"{c['name']} is {_fmt(c['value'])}"
    elif math.isnan(lo):
        where = f"{c['name']} is {_fmt(c['value'])} ({c['ci_method']})"
    else:
        label = "95% CI" if c["ci_method"].startswith("95%") else "range over seeds" if c["ci"][0] != c["ci"][1] \
            else "in every seed"
        where = f"{c['name']} is {_fmt(c['value'])} ({label} {_fmt(lo, True)} to {_fmt(hi, True)})"
    m = c.get("margin") or 0.0
    edge = c["threshold"] + (m if c["op"] in (">", ">=") else -m)
    if c["status"] == "holds":
        return f"{where}: {side} {_fmt(edge)}, as claimed" + (f" (an effect beyond the margin {_fmt(m)})" if m else "")
    if c["status"] == "fails":
        if m and (_OPS[c["op"]](hi if c["op"] in (">", ">=") else lo, c["threshold"])):
            return (f"{where}: inside the margin of ±{_fmt(m)} around {_fmt(c['threshold'])}, no practical effect, "
                    "against the claim")
        return f"{where}: not {side} {_fmt(c['threshold'])}, against the claim"
    n = len(c["values"] or [])
    return f"{where}: not distinguishable from {_fmt(edge)} with {n} random seed{'s' * (n != 1)}"


def _fmt(v: float, signed: bool = False) -> str:
    return f"{v:+.4g}" if signed and v and math.isfinite(v) else f"{v:.4g}"


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


PANEL_KINDS = ("lines", "points", "boxes", "bars")


def panel(kind: str, title: str, xlabel: str = "", ylabel: str = "", logy: bool = False, **data: Any) -> dict:
    """One plot: ``kind`` is ``"lines"`` (``series=``), ``"points"`` (``series=``, drawn as dots: a
    scatter of a data set), ``"boxes"`` (``boxes=``) or ``"bars"`` (``labels=``, ``values=``,
    optional ``errors=``); any kind takes ``refs=[{"y", "label"}]``, reference levels drawn as
    labelled dashed lines that the axis is stretched to show."""
    if kind not in PANEL_KINDS:
        raise ValueError(f"panel kind must be one of {list(PANEL_KINDS)}, got {kind!r}")
    return {"kind": kind, "title": title, "xlabel": xlabel, "ylabel": ylabel, "logy": logy, **data}


def figure(title: str, *panels: dict, caption: str = "", sharey: bool = False) -> dict:
    """Panels side by side under one title (what the figure shows); one image in the report.

    ``caption`` says what to see in it (shown under the image); ``sharey`` gives the panels one
    y axis, for panels meant to be compared.
    """
    return {"title": title, "panels": list(panels), "caption": caption, "sharey": sharey}


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence]) -> dict:
    """A table of the report, also written as a CSV."""
    return {"title": title, "columns": list(columns), "rows": [[to_json(c) for c in r] for r in rows]}


def _floats(xs: Iterable) -> list[float]:
    if isinstance(xs, torch.Tensor):
        return [float(v) for v in xs.detach().flatten().tolist()]
    return [float(v) for v in xs]


def to_json(obj: Any, at: str = "record") -> Any:
    """Tensors, numpy scalars and tuples to plain JSON types; non-finite floats stay floats
    (``json`` writes them as NaN/Infinity, which Python reads back). Anything else raises a
    ``TypeError`` naming where it is (``at``, e.g. ``record.params['model']``)."""
    if isinstance(obj, torch.Tensor):
        return to_json(obj.detach().cpu().tolist(), at)
    if isinstance(obj, dict):
        bad = next((k for k in obj if not isinstance(k, (str, int, float, bool)) and k is not None), None)
        if bad is not None:
            raise TypeError(f"{at} has a key {bad!r} of type {type(bad).__name__}; JSON keys are text")
        return {str(k): to_json(v, f"{at}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v, f"{at}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.ndarray | np.generic):
        return to_json(obj.tolist(), at)
    raise TypeError(f"{at} is a {type(obj).__name__} ({obj!r:.60}), which JSON cannot hold; store a number, "
                    "text, a list or a dict (a tensor or numpy value is converted)")


def validate(records: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the record unless ``records`` can be rendered."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: records must be a list of dicts, got a {type(records).__name__}")
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: record {i} is a {type(rec).__name__}, expected a dict (see normlab.lab.records)")
        missing = [key for key in _REQUIRED if key not in rec]
        if missing:
            raise ValueError(f"{where}: record {i} ({rec.get('name', '?')!r}) lacks {missing}; see normlab.lab.records")
        name = rec["name"]
        if not (isinstance(name, str) and _NAME.match(name)):
            raise ValueError(
                f"{where}: record {i} is named {name!r}; a name names files and anchors, so use only "
                "letters, digits, '_', '-' and '.'"
            )
        if name in seen:
            raise ValueError(f"{where}: two records are named {name!r}; names must be unique")
        if not (isinstance(rec["verdict"], dict) and rec["verdict"].get("status") in VERDICTS):
            raise ValueError(f"{where}: record {name!r} needs verdict = {{'status': one of {list(VERDICTS)}, "
                             "'summary': str}")
        if (wrong := problem(rec)) is not None:
            raise ValueError(f"{where}: experiment {name!r}: {wrong}")
        seen.add(name)


_NUMBER = (int, float)


def problem(rec: dict) -> str | None:
    """The first field of a record that the page cannot show, as ``field: what is wrong``, or None
    (a figure whose panels cannot be drawn is shown as an error box instead, see _figure_html)."""
    def kind(v):
        return type(v).__name__

    for key in ("title", "claim", "source"):
        if key in rec and not isinstance(rec[key], str):
            return f"{key} must be text, got {kind(rec[key])}"
    for key, cls in (("checks", list), ("figures", list), ("tables", list), ("notes", list), ("params", dict)):
        if key in rec and rec[key] is not None and not isinstance(rec[key], cls):
            return f"{key} must be a {cls.__name__}, got {kind(rec[key])}"
    for i, c in enumerate(rec.get("checks") or []):
        at = f"checks[{i}]"
        if not isinstance(c, dict):
            return f"{at} must be a dict, got {kind(c)}"
        if not isinstance(c.get("name"), str):
            return f"{at}.name must be text"
        if c.get("status") not in STATUSES:
            return f"{at}.status must be one of {list(STATUSES)}, got {c.get('status')!r}"
        if "value" in c and c["value"] is not None and not isinstance(c["value"], _NUMBER):
            return f"{at}.value must be a number, got {c['value']!r}"
        if not isinstance(c.get("threshold"), _NUMBER):
            return f"{at}.threshold must be a number, got {c.get('threshold')!r}"
        if "margin" in c and not (isinstance(c["margin"], _NUMBER) and c["margin"] >= 0):
            return f"{at}.margin must be a number >= 0, got {c['margin']!r}"
        if not (isinstance(c.get("op"), str) and c["op"] in _OPS):
            return f"{at}.op must be one of {list(_OPS)}, got {c.get('op')!r}"
        if "value" not in c:
            return f"{at} has no value"
        ci = c.get("ci")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, _NUMBER) for v in ci)):
            return f"{at}.ci must be [low, high], got {ci!r}"
    for i, t in enumerate(rec.get("tables") or []):
        at = f"tables[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("columns"), list) or not isinstance(t.get("rows"), list):
            return f"{at} must be {{'title', 'columns': [...], 'rows': [[...], ...]}}"
        bad = next((j for j, r in enumerate(t["rows"]) if not isinstance(r, list) or len(r) != len(t["columns"])), None)
        if bad is not None:
            return f"{at}.rows[{bad}] must be a list of {len(t['columns'])} cells, one per column"
    for i, f in enumerate(rec.get("figures") or []):
        at = f"figures[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("panels"), list):
            return f"{at} must be {{'title', 'panels': [...]}}"
        for j, pan in enumerate(f["panels"]):
            if not isinstance(pan, dict):
                return f"{at}.panels[{j}] must be a dict (see panel()), got {kind(pan)}"
            if pan.get("kind") not in ("lines", "points"):
                continue  # other kinds are read only when drawn: a panel that cannot be drawn is an error box
            lines = pan.get("series")
            if not isinstance(lines, list):
                return f"{at}.panels[{j}].series must be a list of series(), got {kind(lines)}"
            for k, line in enumerate(lines):  # the curves' CSV reads these
                where = f"{at}.panels[{j}].series[{k}]"
                if not (isinstance(line, dict) and isinstance(line.get("x"), list) and isinstance(line.get("y"), list)):
                    return f"{where} must be {{'label', 'x': [...], 'y': [...]}}"
                for band in ("lo", "hi"):
                    if line.get(band) is not None and not (isinstance(line[band], list)
                                                           and len(line[band]) >= min(len(line["x"]), len(line["y"]))):
                        return f"{where}.{band} must be a list as long as x and y"
    if rec.get("seconds") is not None and not isinstance(rec["seconds"], _NUMBER):
        return f"seconds must be a number, got {kind(rec['seconds'])}"
    if any(not isinstance(n, str) for n in rec.get("notes") or []):
        return "notes must be a list of text"
    return None
