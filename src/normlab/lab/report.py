"""The lab report: one self-contained HTML page, plus JSON and CSV files, built from records.

:func:`write_report` turns the records experiments return (their shape is the contract in
:mod:`normlab.lab.records`) into a directory that opens offline, with nothing fetched from
anywhere::

    out_dir/
      index.html         the page: inline CSS, figures embedded as base64 PNGs, no scripts
      records.json       {"meta": {...}, "records": [...], "files": [the CSVs]}, the only input
                         rebuild() needs
      <name>-<k>.csv     table k (from 1) of experiment <name>; header = the table's columns
      <name>-curves.csv  every point of every "lines" panel: figure,panel,series,x,y,lo,hi

What the page shows, top to bottom:

1. "normlab report", the run's ``meta`` (version, command, date, device, total seconds:
   whatever keys it has) as a definition list, and a summary table with one row per
   experiment: its name (a link to its section), title, verdict (✔ supported in green,
   ✘ not supported in red, ? inconclusive in amber) and wall time in seconds, after a short
   "how to read this page" (what a check, a random seed, an interval and each verdict mean);
2. one ``<section id="<name>">`` per experiment: the title, where the claim comes from, the claim
   quoted, the verdict and its summary, the parameters that were run, the checks behind the
   verdict (value, 95% interval over random seeds, the claimed side, status, detail), each
   figure with its title as caption,
   each table (floats to 4 significant digits), and the notes.

The page computes nothing: it shows what the records say, so ``normlab report DIR``
(:func:`rebuild`) recreates it from ``records.json`` alone, e.g. after the style changes.
A figure that cannot be drawn is replaced by an error message (and a warning) so that one bad
record does not cost the rest of the page.

>>> from normlab.lab.records import figure, panel
>>> png = render_figure(figure("demo", panel("bars", "one bar", labels=["a"], values=[1.0])))
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import textwrap
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .records import validate

__all__ = ["write_report", "check_out", "load_records", "rebuild", "render_figure"]

_VERDICTS = {"supported": ("ok", "✔ supported"), "not supported": ("bad", "✘ not supported"),
             "inconclusive": ("open", "? inconclusive"), "not run": ("open", "· not run"),
             "not testable": ("open", "— not testable")}
_STATUSES = {"holds": ("ok", "✔ holds"), "fails": ("bad", "✘ fails"), "undecided": ("open", "? undecided")}

RECORDS_FILE = "records.json"
INDEX_FILE = "index.html"
CURVE_COLUMNS = ("figure", "panel", "series", "x", "y", "lo", "hi")

_CSV = re.compile(r"[\w.-]+-(\d+|curves)\.csv\Z")  # the names of the CSVs write_report writes
_FIGURE_INCHES = 11.5  # the page's content width (1150 CSS px at 100 px per inch)...
_PANEL_HEIGHT = 3.4
_DPI = 192  # ...drawn at 2x, so the PNGs stay sharp on high-density screens
_PANELS_PER_ROW = 3

# One colour, line style and marker per method, the same in every figure of the report.
_METHODS = {
    "raw": ("#7f7f7f", "--", "s"), "zscore": ("#17becf", "-", "o"),
    "none": ("#222222", ":", "x"), "batch": ("#d62728", "-", "o"), "layer": ("#1f77b4", "-", "s"),
    "group": ("#2ca02c", "-.", "^"), "instance": ("#9467bd", "--", "v"), "rms": ("#ff7f0e", "-", "D"),
    "weight": ("#8c564b", "--", "P"), "cosine": ("#e377c2", "-.", "*"), "batchrenorm": ("#bcbd22", ":", "h"),
    "bn→gn": ("#98df8a", "--", "<"), "syncbn": ("#ff9896", "--", ">"),
    "tanh/default": ("#6baed6", "--", "s"), "tanh/xavier": ("#08519c", "-", "o"),
    "sigmoid/default": ("#fdae6b", "--", "s"), "sigmoid/xavier": ("#d94801", "-", "o"),
    "eval()": ("#1f77b4", "-", "o"), "forgot eval()": ("#d62728", "--", "x"),
}
_ALIASES = {"bn": "batch", "zscore+bn": "batch", "gn": "group", "ln": "layer"}
# for labels that name no method (epochs, momenta): contrasting colours in the order they come
_OTHER = (("#4c72b0", "-", "o"), ("#dd8452", "--", "s"), ("#55a868", "-.", "^"), ("#8172b3", ":", "D"),
          ("#937860", "-", "v"), ("#da8bc3", "--", "P"))
_NEUTRAL = "#4c72b0"


def method_style(label: str) -> tuple[str, str, str] | None:
    """``(colour, linestyle, marker)`` of the method a series, box group or bar names, or None.

    The same method has the same style in every figure: ``"SyncBN ×2"`` is styled as SyncBN,
    ``"BN"`` and ``"zscore+BN"`` as ``"batch"``. Labels that name no method (epochs, momenta)
    get None, and the figure gives them contrasting colours in order.

    >>> method_style("BN") == method_style("batch") == method_style("zscore+BN")
    True
    >>> method_style("epoch 5") is None
    True
    """
    key = str(label).lower()
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        key = next((k for k in _METHODS if key.startswith(k)), key)
    return _METHODS.get(key)


def _styles(labels: Sequence[str]) -> list[tuple[str, str, str]]:
    """A style per label: its method's, else the next contrasting one not yet used in the panel."""
    spare = iter(_OTHER * (1 + len(labels) // len(_OTHER)))
    return [method_style(lab) or next(spare) for lab in labels]
_ROTATE_OVER = 6  # more x tick labels than this are rotated so they do not overlap
_BOX_STATS = ("whislo", "q1", "med", "q3", "whishi")


# -- files ---------------------------------------------------------------------------------------


def check_out(out_dir: str | Path, *, force: bool = False) -> Path:
    """Check, before anything runs, that ``out_dir`` can take a report, and create it.

    The folder must be new, empty, or a normlab report (whose files a new report may replace);
    one that holds anything else is refused, naming what it holds, unless ``force``. It is
    created and written to once, so that a folder that cannot be written is found before the
    experiments run rather than after. Raises ``ValueError`` saying what is wrong and the fix.
    """
    if not str(out_dir).strip():
        raise ValueError("the output folder is empty; name one, e.g. --out normlab-report")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; pass another --out")
    if out.is_dir() and not force and (foreign := _foreign(out, *_earlier(out))):
        raise ValueError(f"{out} holds files that are not a normlab report ({_names(foreign)}); a report never "
                         "overwrites them: pass a new or empty folder, or --force to write the report beside them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write a report into {out}: {err.strerror or err}; pass a folder you can "
                         "write to") from err
    return out


def write_report(records: list[dict], out_dir: str | Path, *, meta: dict | None = None, page: bool = True,
                 force: bool = False) -> Path:
    """Write ``records.json``, the CSV files and ``index.html`` into ``out_dir``; return the page.

    A report already in ``out_dir`` is added to: its records of other experiments are kept (the
    page shows every experiment's latest record, and ``meta`` says which came from earlier runs);
    a record of the same name replaces the old one, and the CSVs only the old one had are removed.
    Files the report did not write are never overwritten or removed (``force``: a CSV or page of
    the report's names that is not the report's may be overwritten).

    Args:
        records: one dict per experiment, shaped as :mod:`normlab.lab.records` describes; names
            must be unique and made of letters, digits, ``_``, ``-`` and ``.``.
        out_dir: created with its parents if missing.
        meta: facts about the run shown at the top of the page (version, command, date, device,
            total seconds, ...); stored in ``records.json`` beside the records.
        page: also render ``index.html`` (``False``: the records and CSVs only, e.g. after each
            experiment of a run, so that an error later loses nothing; ``normlab report`` draws
            the page from them).
        force: see above.

    Returns:
        The path of ``index.html``.
    """
    validate(records, "write_report(records)")
    meta = dict(meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier, ours = _earlier(out)
    new = {rec["name"]: rec for rec in records}
    kept = [rec["name"] for rec in earlier if rec["name"] not in new]
    merged = [new.pop(rec["name"], rec) for rec in earlier] + list(new.values())
    if kept:
        meta["kept from an earlier run"] = ", ".join(kept)
    tables = _tables(merged)
    theirs = set() if force else set(_foreign(out, earlier, ours))
    foreign = [n for n in (*tables, INDEX_FILE, RECORDS_FILE) if n in theirs]
    if foreign:
        raise ValueError(f"{out} holds {_names(foreign)}, which the report did not write; it never overwrites "
                         "them: write the report into another folder, or pass force=True (--force)")
    stale = ours - set(tables)  # CSVs of replaced records that the new ones do not write: they would mislead
    _replace(out / RECORDS_FILE, json.dumps({"meta": meta, "records": merged, "files": sorted(tables)}, indent=1,
                                            allow_nan=True))
    for name, (header, rows) in tables.items():
        _write_csv(out / name, header, rows)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    if page:
        _replace(out / INDEX_FILE, _page(merged, meta))
    return out / INDEX_FILE


def _tables(records: list[dict]) -> dict[str, tuple]:
    """file name -> (header, rows) of every CSV the report of ``records`` writes."""
    tables = {}
    for rec in records:
        for k, tab in enumerate(rec.get("tables") or (), start=1):
            tables[f"{rec['name']}-{k}.csv"] = (tab["columns"], tab["rows"])
        lines = list(_lines_panels(rec))
        if lines:
            tables[f"{rec['name']}-curves.csv"] = (CURVE_COLUMNS, _curve_rows(lines))
    return tables


def _earlier(out: Path) -> tuple[list[dict], set[str]]:
    """The records of the report already in ``out`` and the CSVs it wrote (none where there is
    no report, or one that cannot be read: a broken file is then foreign, and never replaced)."""
    try:
        with open(out / RECORDS_FILE, encoding="utf-8") as f:
            data = json.load(f)
        records = data["records"]
        validate(records, "")
        files = data.get("files", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [], set()
    return records, {f for f in files if isinstance(f, str) and _CSV.match(f)} if isinstance(files, list) else set()


def _foreign(out: Path, earlier: list[dict], ours: set[str]) -> list[str]:
    """The files in ``out`` a report did not write (hidden files aside), given what
    :func:`_earlier` found there."""
    mine = {INDEX_FILE, RECORDS_FILE, *ours} if earlier else set()
    return sorted(p.name for p in out.iterdir() if p.name not in mine and not p.name.startswith("."))


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_records(out_dir: str | Path) -> tuple[list[dict], dict]:
    """Read ``out_dir/records.json`` back as ``(records, meta)``.

    Raises:
        FileNotFoundError: there is no ``records.json`` in ``out_dir``.
        ValueError: the file is not JSON, or not ``{"meta": {...}, "records": [record, ...]}``.
    """
    path = Path(out_dir) / RECORDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `normlab run --out {out_dir}` first")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun `normlab run --out {out_dir}`") from err
    if not (isinstance(data, dict) and isinstance(data.get("records"), list) and isinstance(data.get("meta", {}), dict)):
        raise ValueError(
            f'{path} must hold {{"meta": {{...}}, "records": [...]}}, got a {type(data).__name__} '
            f"with keys {sorted(data) if isinstance(data, dict) else []}; rerun `normlab run --out {out_dir}`"
        )
    validate(data["records"], str(path))
    return data["records"], data.get("meta", {})


def rebuild(out_dir: str | Path) -> Path:
    """Rewrite the report in ``out_dir`` from its ``records.json`` (``normlab report DIR``)."""
    records, meta = load_records(out_dir)
    return write_report(records, out_dir, meta=meta)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(map(_csv_cell, header))
        writer.writerows(map(_csv_cell, row) for row in rows)


def _csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) starts with ' instead."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)  # a signed number is data
        except ValueError:
            return "'" + value
    return value


def _lines_panels(rec: dict) -> Iterator[tuple[dict, dict]]:
    """Every ``(figure, panel)`` of the record whose panel is a "lines" panel."""
    for fig in rec.get("figures") or ():
        for pan in fig["panels"]:
            if pan.get("kind") == "lines":
                yield fig, pan


def _curve_rows(lines: Iterable[tuple[dict, dict]]) -> Iterator[list[Any]]:
    """Long format, one row per point; ``lo``/``hi`` are blank for a series without a band."""
    for fig, pan in lines:
        for s in pan.get("series", ()):
            lo, hi = s.get("lo"), s.get("hi")
            for i, (x, y) in enumerate(zip(s["x"], s["y"])):
                band = ["" if b is None else b[i] for b in (lo, hi)]
                yield [fig.get("title", ""), pan.get("title", ""), s.get("label", ""), x, y, *band]


# -- figures -------------------------------------------------------------------------------------


def render_figure(fig: dict) -> bytes:
    """Draw one figure dict (see :mod:`normlab.lab.records`) and return it as PNG bytes.

    The figure spans the page's content width, its panels side by side, 3 to a row, at twice
    the screen's resolution. Every method keeps its colour, line style and marker in every
    figure (:func:`method_style`), and one legend for the whole figure sits to the right of the
    panels, off the data. NaN values are left out of the drawing and infinite ones are treated
    as NaN; ``logy`` gives a log axis when every drawn value is positive and a symmetric-log
    axis otherwise (bars on a log axis are drawn as dots: a bar's length means nothing there).

    Raises:
        ValueError: the figure has no panels or a panel of unknown kind.
    """
    panels = fig["panels"]
    if not panels:
        raise ValueError(f"figure {fig.get('title', '')!r} has no panels; give figure() at least one panel()")
    ncols = min(_PANELS_PER_ROW, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # A bare Figure with its own Agg canvas, not pyplot: no global state to close, and the
    # figure is freed with its last reference.
    mfig = Figure(figsize=(_FIGURE_INCHES, _PANEL_HEIGHT * nrows + 0.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(mfig)
    axes = list(mfig.subplots(nrows, ncols, squeeze=False, sharey=bool(fig.get("sharey"))).flat)
    for ax, pan in zip(axes, panels):
        _draw_panel(ax, pan)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes[: len(panels)]:
        extra = getattr(ax, "normlab_handles", [])
        for handle, label in [*zip(*ax.get_legend_handles_labels()), *((h, h.get_label()) for h in extra)]:
            if label and not label.startswith("_"):
                handles.setdefault(label, handle)
    if len(handles) > 1 or any(pan.get("kind") == "boxes" for pan in panels) and handles:
        mfig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small", frameon=False)
    if fig.get("title"):
        # ~11 characters per inch at the default font size; wrap rather than clip.
        mfig.suptitle(textwrap.fill(fig["title"], int(10 * _FIGURE_INCHES)), fontsize="large")
    buf = io.BytesIO()
    mfig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _draw_panel(ax: Axes, pan: dict) -> None:
    kind = pan.get("kind")
    if kind not in _PAINTERS:
        raise ValueError(f"panel {pan.get('title', '')!r} has kind {kind!r}; expected one of {sorted(_PAINTERS)}")
    drawn = _PAINTERS[kind](ax, pan)
    for ref in pan.get("refs") or ():  # reference levels (a threshold, a rounding unit), dashed and labelled
        if isinstance(ref, dict) and isinstance(ref.get("y"), (int, float)):
            ax.axhline(ref["y"], color="#777", linestyle="--", linewidth=1)
            ax.annotate(str(ref.get("label", "")), (1.0, ref["y"]), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize="small", color="#555")
            drawn = [*drawn, float(ref["y"])]  # the axis reaches it
    ax.set_title(pan.get("title", ""), fontsize="medium")
    ax.set_xlabel(pan.get("xlabel", ""))
    ax.set_ylabel(pan.get("ylabel", ""))
    if pan.get("logy"):
        _log_scale(ax, drawn)


def _draw_lines(ax: Axes, pan: dict) -> list[float]:
    """One curve per series, its ``lo``–``hi`` band shaded in the curve's colour."""
    drawn: list[float] = []
    series = pan.get("series", [])
    for s, (colour, style, marker) in zip(series, _styles([s.get("label", "") for s in series])):
        x, y = _plottable(s["x"]), _plottable(s["y"])
        few = len(x) <= 12  # markers where points are few enough to see one by one
        ax.plot(x, y, label=s.get("label", ""), color=colour, linestyle=style, linewidth=1.8,
                marker=marker if few else None, markersize=5, markevery=None)
        drawn += y
        if s.get("lo") is not None:
            lo, hi = _plottable(s["lo"]), _plottable(s["hi"])
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
            drawn += lo + hi
    ax.grid(alpha=0.3)
    if pan.get("logx") and series:
        ax.set_xscale("log", base=2)  # e.g. batch sizes 2, 4, ..., 32: even steps
        ticks = sorted({v for s in series for v in _plottable(s["x"]) if v == v and v > 0})
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    return drawn


def _draw_points(ax: Axes, pan: dict) -> list[float]:
    """One cloud of dots per series (a scatter of a data set, its classes by colour)."""
    drawn: list[float] = []
    series = pan.get("series", [])
    for s, (colour, _, marker) in zip(series, _styles([s.get("label", "") for s in series])):
        y = _plottable(s["y"])
        ax.scatter(_plottable(s["x"]), y, s=10, color=colour, marker=marker or "o", alpha=0.6, label=s.get("label", ""),
                   linewidths=0)
        drawn += y
    ax.grid(alpha=0.3)
    return drawn


def _draw_boxes(ax: Axes, pan: dict) -> list[float]:
    """Boxes from summary statistics; a box with a non-finite statistic leaves an empty slot."""
    boxes = pan.get("boxes", [])
    groups = list(dict.fromkeys(b.get("group") for b in boxes))  # in order of first appearance
    colour = {g: c for g, (c, _, _) in zip(groups, _styles([str(g) for g in groups]))}
    stats, positions, colours = [], [], []
    for pos, b in enumerate(boxes, start=1):
        st = {key: float(b[key]) for key in _BOX_STATS}
        if all(math.isfinite(v) for v in st.values()):
            stats.append(st)
            positions.append(pos)
            colours.append(colour[b.get("group")])
    if stats:
        art = ax.bxp(
            stats, positions, showfliers=False, patch_artist=True, manage_ticks=False,
            medianprops={"color": "black"},
        )
        for patch, c in zip(art["boxes"], colours):
            patch.set_facecolor(c)
            patch.set_alpha(0.8)
    _label_ticks(ax, [b.get("label", "") for b in boxes])
    # legend entries for the figure's one legend (boxes have no handles of their own)
    ax.normlab_handles = [Patch(facecolor=colour[g], label=g) for g in groups if g is not None]
    ax.grid(axis="y", alpha=0.3)
    return [v for st in stats for v in st.values()]


def _draw_bars(ax: Axes, pan: dict) -> list[float]:
    """One bar per label, with error bars when ``errors`` is given."""
    values = _plottable(pan.get("values", []))
    errors = pan.get("errors")
    yerr = None if errors is None else _plottable(errors)
    labels = pan.get("labels", [])
    # bars of methods in the methods' colours; other bars (momenta, identities) in one colour
    colours = [(method_style(lab) or (_NEUTRAL,))[0] for lab in labels] if labels else None
    positions = range(1, len(values) + 1)
    if pan.get("logy"):  # on a log axis a bar's length means nothing: dots instead
        ax.errorbar(positions, values, yerr=yerr, fmt="none", ecolor="#555", capsize=3)
        ax.scatter(positions, values, c=colours, s=40, zorder=3)
    else:
        ax.bar(positions, values, yerr=yerr, capsize=3, color=colours)
    _label_ticks(ax, labels)
    ax.grid(axis="y", alpha=0.3)
    return values


_PAINTERS: dict[str, Callable[[Axes, dict], list[float]]] = {
    "lines": _draw_lines,
    "points": _draw_points,
    "boxes": _draw_boxes,
    "bars": _draw_bars,
}


def _plottable(values: Iterable[float]) -> list[float]:
    """Floats with ±inf as NaN: matplotlib leaves NaN out, but inf breaks autoscaling."""
    return [v if math.isfinite(v) else math.nan for v in map(float, values)]


def _label_ticks(ax: Axes, labels: Sequence[str]) -> None:
    """Label positions 1..n, rotated when there are many."""
    if not labels:
        return
    positions = range(1, len(labels) + 1)
    if len(labels) > _ROTATE_OVER or sum(len(str(lab)) for lab in labels) > 40:
        ax.set_xticks(positions, labels, rotation=45, ha="right", fontsize="small")
    else:
        ax.set_xticks(positions, labels)
    ax.set_xlim(0.5, len(labels) + 0.5)


def _log_scale(ax: Axes, drawn: Iterable[float]) -> None:
    """Log y axis if every finite drawn value is positive, else symlog, linear below the
    smallest nonzero magnitude so that small values stay visible next to zero or negatives."""
    finite = [v for v in drawn if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
        return
    nonzero = [abs(v) for v in finite if v != 0]
    ax.set_yscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)


# -- the page ------------------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; }
h2 small { color: #777; font-weight: normal; font-size: .6em; }
section { border-top: 1px solid #ddd; margin-top: 2.5em; padding-top: .5em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; font-size: .85em; color: #555; }
dl.meta dt { font-weight: bold; }
dl.meta dd { margin: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
blockquote { border-left: 4px solid #bbb; margin: 1em 0; padding: .2em 1em; color: #444; font-style: italic; }
.ok { color: #1a7f37; font-weight: bold; }
.bad { color: #c62828; font-weight: bold; }
.open { color: #9a6700; font-weight: bold; }
.ok, .bad, .open { white-space: nowrap; }
.howto { background: #f7f7f4; border: 1px solid #e4e4dc; padding: .4em 1.2em; border-radius: 4px; }
.source { color: #666; font-size: .9em; }
code { background: #f4f4f4; padding: .1em .3em; border-radius: 3px; font-size: .85em; }
figure { margin: 1.5em 0; }
figure img { width: 100%; height: auto; }
figcaption { color: #555; font-size: .9em; }
figure.error p { color: #c62828; font-family: monospace; }
"""


def _page(records: Sequence[dict], meta: dict) -> str:
    body = [
        "<h1>normlab report</h1>",
        _meta_list(meta),
        _HOW_TO_READ,
        _claims_index(records),
        _html_table(["experiment", "title", "verdict", "seconds"], (_summary_row(r) for r in records),
                    caption="The experiments"),
        *(_section(r) for r in records),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>normlab report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


_HOW_TO_READ = """<div class="howto"><h3>How to read this page</h3>
<p>Each experiment tests one claim of Lesson 14.1 (“数据归一化与Batch Normalization理论基础”), the survey
“Norm相关总结” or a paper, by training small networks and measuring. A <b>check</b> is one number the
claim predicts to lie on one side of a threshold, e.g. “Z-Score's test error divided by raw inputs'
is below 1”. Training depends on the random seed (initial weights, batch order), so each check is
measured once per <b>random seed</b> and reported as the mean with its <b>95% interval</b> (a
t-interval over the seeds): the range that, by the seeds' spread, likely holds the value more
runs would give. A check <span class="ok">✔ holds</span> when the whole interval lies on the
claimed side, <span class="bad">✘ fails</span> when it lies on the other side, and is
<span class="open">? undecided</span> when the interval still contains the threshold: the seeds
disagree, and more of them (the tour runs 20 to 50, <code>--full</code> 50) can decide. Where a check
names a <b>margin</b> (“&lt; 0 by &gt; 0.1”), an effect smaller than the margin does not matter:
the claimed effect must clear it to hold, and an interval inside ±margin is decided too —
<span class="bad">✘ fails</span>, no practical effect. A claim is
<span class="ok">✔ supported</span> when every check holds, <span class="bad">✘ not supported</span>
when one fails, and <span class="open">? inconclusive</span> otherwise. Checks computed without
randomness (the algebra of <code>affine</code>) are exact and have no interval.</p></div>"""


def _claims_index(records: Sequence[dict]) -> str:
    """Every claim of the two texts, its source, the experiments that test it and its verdict."""
    from .claims import CLAIMS, decide

    by_name = {r["name"]: r for r in records}
    rows, counts = [], {}
    for claim in CLAIMS:
        d = decide(claim, by_name)
        counts[d["status"]] = counts.get(d["status"], 0) + 1
        tested = ", ".join(f'<a href="#{_esc(e)}">{_esc(e)}</a>' if e in by_name else _esc(e)
                           for e in dict.fromkeys(e for e, _ in claim.tests)) or "—"
        note = f"<br><small>{_esc(claim.note)}</small>" if claim.note else ""
        rows.append([str(claim.number), _esc(claim.text) + note, _esc(claim.source), tested,
                     f'<span title="{_esc(d["summary"])}">{_badge(_VERDICTS, d["status"])}</span>'])
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    return ('<h2 id="claims">The claims</h2>'
            + _html_table(["#", "claim", "source", "tested by", "verdict"], rows,
                          caption=f"Every claim of Lesson 14.1 and the survey, and what this report decides ({tally}); "
                                  "the verdict combines the claim's checks as an experiment's does (hover for why)"))


def _meta_list(meta: dict) -> str:
    if not meta:
        return ""
    items = "".join(f"<dt>{_esc(key)}</dt><dd>{_cell(value)}</dd>" for key, value in meta.items())
    return f'<dl class="meta">{items}</dl>'


def _summary_row(rec: dict) -> list[str]:
    name = rec["name"]
    return [f'<a href="#{_esc(name)}">{_esc(name)}</a>', _esc(rec["title"]), _badge(_VERDICTS, rec["verdict"]["status"]),
            _seconds(rec)]


def _section(rec: dict) -> str:
    name, v = rec["name"], rec["verdict"]
    parts = [f'<section id="{_esc(name)}">', f"<h2>{_esc(rec['title'])} <small>{_esc(name)}</small></h2>"]
    if rec.get("source"):
        parts.append(f'<p class="source">Source: {_esc(rec["source"])}</p>')
    parts.append(f"<blockquote>“{_esc(rec['claim'])}”</blockquote>")
    parts.append(f"<p>{_badge(_VERDICTS, v['status'])} — {_esc(v.get('summary', ''))}</p>")
    if rec.get("params"):
        params = " ".join(f"<code>{_esc(key)}={_cell(value)}</code>" for key, value in rec["params"].items())
        parts.append(f"<p>Parameters: {params}</p>")
    if rec["checks"]:
        head = ["check", "value", "95% interval", "claimed", "status", "detail"]
        rows = (
            [_esc(c["name"]), _cell(c["value"]), _interval(c), _esc(f"{c['op']} {c['threshold']:.4g}" + (f" by > {c['margin']:.4g}" if c.get("margin") else "")),
             _badge(_STATUSES, c["status"]), _esc(c.get("detail", ""))]
            for c in rec["checks"]
        )
        parts.append(_html_table(head, rows, caption="Checks (value: the mean over random seeds, or the one exact "
                                                     "number where there is no randomness)"))
    parts += [_figure_html(name, fig) for fig in rec.get("figures") or ()]
    parts += [
        _html_table([_esc(c) for c in tab["columns"]], ([_cell(v) for v in row] for row in tab["rows"]), caption=tab.get("title", ""))
        for tab in rec.get("tables") or ()
    ]
    if rec.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_esc(note)}</li>" for note in rec["notes"]) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _figure_html(record_name: str, fig: dict) -> str:
    caption = f"<figcaption>{_esc(fig['caption'])}</figcaption>" if fig.get("caption") else ""
    try:
        png = render_figure(fig)
    except Exception as err:  # one bad figure (bad data, odd values) must not cost the whole page
        message = f"{record_name}: figure {fig.get('title', '')!r} could not be drawn: {type(err).__name__}: {err}"
        warnings.warn(message, stacklevel=2)
        return f'<figure class="error"><p>{_esc(message)}</p>{caption}</figure>'
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(fig.get("title", ""))}">{caption}</figure>'


def _html_table(head: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "") -> str:
    """A table from cells that are already HTML (escaped text, links, badges)."""
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    thead = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    tbody = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{cap}<thead>{thead}</thead><tbody>{tbody}</tbody></table>"


def _badge(kinds: dict, status: str) -> str:
    css, text = kinds[status]
    return f'<span class="{css}">{text}</span>'


def _interval(c: dict) -> str:
    """A check's interval as page text: "lo to hi (how)", or how it was decided without one."""
    lo, hi = c.get("ci") or (math.nan, math.nan)
    how = c.get("ci_method", "")
    if c.get("values") is None or math.isnan(lo):
        return _esc(how)
    return f"{_cell(lo)} to {_cell(hi)}<br><small>{_esc(how)}</small>"


def _seconds(rec: dict) -> str:
    seconds = rec.get("seconds")
    return "" if seconds is None else f"{seconds:.1f}"


def _cell(value: Any) -> str:
    """A JSON value as escaped page text: floats to 4 significant digits, lists/dicts as JSON.

    >>> [_cell(v) for v in (3.14159265, 1e-7, float("nan"), float("inf"), 12, True, None, "<b>")]
    ['3.142', '1e-07', 'nan', 'inf', '12', 'True', '', '&lt;b&gt;']
    >>> _cell([0, 1])
    '[0, 1]'
    """
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif value is None:
        text = ""
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, allow_nan=True)
    else:
        text = str(value)
    return _esc(text)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)
