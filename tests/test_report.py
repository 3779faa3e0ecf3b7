"""normlab.lab.report: the files it writes, the offline page, the PNGs, and rebuilding from JSON."""

from __future__ import annotations

import csv
import json
import math
import os
import struct
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from normlab.lab import report
from normlab.lab.records import box, check, figure, panel, series, table, verdict
from normlab.lab.report import check_out, load_records, rebuild, render_figure, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN, INF = float("nan"), float("inf")


def _record(name, title, claim, checks, **optional):
    return {"name": name, "title": title, "claim": claim, "checks": checks, "verdict": verdict(checks), **optional}


def _zscore() -> dict:
    """Lines with bands, NaN and inf, a log axis; bars with errors; a table with NaN."""
    x = [1.0, 2.0, 3.0, 4.0]
    curves = panel(
        "lines", "training loss", "epoch", "loss", logy=True,
        series=[
            series("raw", x, [2.0, 1.5, NAN, 1.2], lo=[1.8, 1.3, NAN, 1.0], hi=[2.2, 1.7, NAN, 1.4]),
            series("z-score", x, [1.0, 0.5, 0.25, INF]),
        ],
    )
    bars = panel("bars", "final loss", ylabel="loss", labels=["raw", "z-score"], values=[1.2, 0.25], errors=[0.1, NAN])
    checks = [check("loss ratio", 4.8, ">", 2.0, "raw / z-score after 4 epochs"), check("epochs to 0.5", NAN, "<", 3)]
    return _record(
        "zscore", "Raw vs Z-Score inputs", "Z-Score inputs converge <script>alert(1)</script> faster", checks,
        source="Lesson 14.1 §2",
        params={"epochs": 4, "seeds": [0, 1]},
        figures=[figure("Loss & accuracy", curves, bars)],
        tables=[table("final loss", ["inputs", "loss", "std"], [["raw", 1.23456789, 0.1], ["z-score", 0.25, NAN]])],
        notes=["quick mode: 4 epochs"],
        seconds=1.25,
    )


def _grads() -> dict:
    """Grouped boxes (one all-NaN, negatives under logy, >6 of them) and a symlog curve; 4 panels wrap."""
    boxes = [box(f"L{i}", [-1.0, 0.5, 2.0 ** i], group="BN" if i % 2 else "none") for i in range(7)]
    boxes.append(box("empty", []))  # no finite values: NaN statistics
    grads = panel("boxes", "gradient per layer", "layer", "grad", logy=True, boxes=boxes)
    signed = panel("lines", "signed", logy=True, series=[series("s", [0, 1, 2], [-1.0, 0.0, 1e-4])])
    ungrouped = panel("boxes", "no groups", boxes=[box("a", [1.0, 2.0, 3.0])])
    bars = panel("bars", "many bars", labels=[f"b{i}" for i in range(8)], values=list(range(8)))
    checks = [check("variance ratio", 1.5, "<", 10.0)]
    return _record("grads", "Gradients per layer", "BN keeps gradients alike", checks,
                   figures=[figure("Gradients", grads, signed, ungrouped, bars)], seconds=0.5)


def _bare() -> dict:
    return _record("bare", "Nothing but the claim", "a claim with no figures", [])


RECORDS = [_zscore(), _grads(), _bare()]
META = {"version": "0.1.0", "command": "normlab run --quick", "device": "cpu", "seconds": 1.75}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "nested" / "run"
    assert write_report(RECORDS, d, meta=META) == d / "index.html"
    return d


@pytest.fixture(scope="module")
def page(out) -> str:
    return (out / "index.html").read_text(encoding="utf-8")


def test_files(out):
    names = {p.name for p in out.iterdir()}
    assert names == {"index.html", "records.json", "zscore-1.csv", "zscore-curves.csv", "grads-curves.csv"}


def test_page_is_offline(page):
    assert 'src="http' not in page and 'href="http' not in page
    assert "<link" not in page and "<script" not in page
    n_figures = sum(len(r.get("figures", [])) for r in RECORDS)
    assert page.count('<img src="data:image/png;base64,') == n_figures


def test_page_content(page):
    for rec in RECORDS:
        assert f'<section id="{rec["name"]}">' in page
        assert f'<a href="#{rec["name"]}">' in page
    assert "✔ supported" in page and "✘ not supported" in page
    assert "Z-Score inputs converge &lt;script&gt;alert(1)&lt;/script&gt; faster" in page
    assert "Loss &amp; accuracy" in page
    assert "<td>1.235</td>" in page and "<td>nan</td>" in page  # 4 significant digits; NaN
    assert "<code>seeds=[0, 1]</code>" in page
    assert "<dt>command</dt><dd>normlab run --quick</dd>" in page
    assert "quick mode: 4 epochs" in page and "Lesson 14.1 §2" in page
    assert "no checks were computed" in page  # the bare record's verdict


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


def test_render_figure_spans_the_page_at_twice_its_resolution_and_wraps_at_three():
    one = render_figure(RECORDS[0]["figures"][0])
    four = render_figure(RECORDS[1]["figures"][0])
    assert one.startswith(PNG_SIGNATURE) and four.startswith(PNG_SIGNATURE)
    width, height = _png_size(one)
    assert width == pytest.approx(2 * 1150, rel=0.05)  # 2x the content width of the page
    assert _png_size(four) == pytest.approx((width, 2 * report._PANEL_HEIGHT * report._DPI + height - (
        report._PANEL_HEIGHT * report._DPI)), abs=2)  # a second row of panels


def test_every_method_keeps_one_style_in_every_figure():
    assert report.method_style("BN") == report.method_style("batch") == report.method_style("zscore+BN")
    assert report.method_style("SyncBN ×2") == report.method_style("syncbn")
    styles = {report.method_style(n) for n in ("none", "batch", "layer", "group", "instance", "rms", "weight",
                                                 "cosine", "batchrenorm", "BN→GN")}
    assert len(styles) == 10 and len({c for c, _, _ in styles}) == 10  # ten methods, ten colours
    assert report.method_style("epoch 5") is None  # not a method: contrasting colours in order
    assert len({c for c, _, _ in report._styles(["epoch 5", "epoch 40", "batch"])}) == 3


@pytest.mark.parametrize(
    "values, scale",
    [([1.0, 10.0, NAN], "log"), ([-1.0, 0.0, 1e-4], "symlog"), ([0.0, 1.0], "symlog"), ([NAN], "symlog")],
)
def test_logy_falls_back_to_symlog(values, scale):
    ax = Figure().subplots()
    report._log_scale(ax, values)
    assert ax.get_yscale() == scale


def test_logx_puts_batch_sizes_on_a_base_2_axis():
    ax = Figure().subplots()
    report._draw_lines(ax, panel("lines", "err", logx=True, series=[series("bn", [2, 8, 32], [0.5, 0.1, 0.05])]))
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "32"]


def test_render_figure_errors():
    with pytest.raises(ValueError, match="no panels"):
        render_figure(figure("empty"))
    with pytest.raises(ValueError, match="'pie'"):
        render_figure({"title": "t", "panels": [{"kind": "pie", "title": "p"}]})


def test_bad_figure_leaves_the_rest_of_the_page(tmp_path):
    broken = _record("broken", "Broken", "c", [], figures=[
        {"title": "pie chart", "panels": [{"kind": "pie", "title": "p"}]},
        figure("fine", panel("bars", "b", labels=["a"], values=[1.0])),
    ])
    with pytest.warns(UserWarning, match="pie chart"):
        page = write_report([broken], tmp_path).read_text(encoding="utf-8")
    assert '<figure class="error">' in page and "kind &#x27;pie&#x27;" in page
    assert page.count("data:image/png;base64,") == 1


def test_records_round_trip(out):
    records, meta = load_records(out)
    assert meta == META
    # NaN != NaN, so compare the JSON text (NaN is written and read back as NaN)
    assert json.dumps(records) == json.dumps(RECORDS)
    assert math.isnan(records[0]["tables"][0]["rows"][1][2])


def test_table_csv(out):
    with open(out / "zscore-1.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    tab = RECORDS[0]["tables"][0]
    assert rows[0] == tab["columns"]
    assert rows[1:] == [[str(v) for v in row] for row in tab["rows"]]


def test_csv_cells_a_spreadsheet_would_run_are_escaped(tmp_path):
    rec = _bare()
    rec["tables"] = [table("t", ["name", "value"], [["=HYPERLINK(1)", -0.5], ["+cmd", "-1.5e3"], ["@x", "ok"]])]
    write_report([rec], tmp_path)
    rows = list(csv.reader(open(tmp_path / f"{rec['name']}-1.csv", encoding="utf-8")))
    assert rows[1:] == [["'=HYPERLINK(1)", "-0.5"], ["'+cmd", "-1.5e3"], ["'@x", "ok"]]


def test_curves_csv(out):
    with open(out / "zscore-curves.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # two series of 4 points
    first, last = rows[0], rows[-1]
    assert (first["figure"], first["panel"], first["series"]) == ("Loss & accuracy", "training loss", "raw")
    assert (float(first["x"]), float(first["y"]), float(first["lo"]), float(first["hi"])) == (1.0, 2.0, 1.8, 2.2)
    assert (last["series"], last["y"], last["lo"], last["hi"]) == ("z-score", "inf", "", "")


def test_rebuild(out):
    before = (out / "index.html").read_text(encoding="utf-8")
    (out / "index.html").unlink()
    assert rebuild(out) == out / "index.html"
    assert (out / "index.html").read_text(encoding="utf-8") == before


def test_a_later_report_adds_to_the_folder_and_removes_only_its_own_stale_csvs(tmp_path):
    write_report(RECORDS, tmp_path, meta=META)
    first = {p.name for p in tmp_path.iterdir()}
    (tmp_path / "mine.csv").write_text("kept\n")  # not the report's: left alone, even if listed
    data = json.loads((tmp_path / "records.json").read_text())
    (tmp_path / "records.json").write_text(json.dumps({**data, "files": data["files"] + ["mine.csv"]}))
    grads = _grads()
    grads["tables"] = []  # the new grads record has no table: its old CSV goes, the others stay
    grads["figures"] = []
    write_report([grads], tmp_path, meta={"command": "second"})
    data = json.loads((tmp_path / "records.json").read_text())
    assert [r["name"] for r in data["records"]] == [r["name"] for r in RECORDS]  # every experiment, latest record
    assert data["records"][[r["name"] for r in RECORDS].index("grads")]["figures"] == []
    assert data["meta"]["kept from an earlier run"] and data["meta"]["command"] == "second"
    names = {p.name for p in tmp_path.iterdir()}
    assert "mine.csv" in names and not any(n.startswith("grads-") for n in names)
    assert names - {"mine.csv"} == {n for n in first if not n.startswith("grads-")}
    rebuild(tmp_path)  # the same records: the same files
    assert {p.name for p in tmp_path.iterdir()} == names


def test_the_report_never_overwrites_a_file_it_did_not_write(tmp_path):
    (tmp_path / "index.html").write_text("my page")
    with pytest.raises(ValueError, match="index.html.*did not write"):
        write_report(RECORDS, tmp_path, meta=META)
    assert (tmp_path / "index.html").read_text() == "my page" and not (tmp_path / "records.json").exists()
    with pytest.raises(ValueError, match="not a normlab report.*index.html.*--force"):
        check_out(tmp_path)
    write_report(RECORDS, tmp_path, meta=META, force=True)  # asked for


@pytest.mark.parametrize("case", ["empty name", "a file", "unwritable", "holds files"])
def test_the_output_folder_is_checked_before_anything_runs(tmp_path, case):
    target = {"empty name": "", "a file": tmp_path / "f", "unwritable": tmp_path / "ro" / "sub",
              "holds files": tmp_path}[case]
    (tmp_path / "f").write_text("data")
    if case == "unwritable":
        if os.getuid() == 0:
            target = Path("/proc/normlab-report")  # root writes anywhere a mode allows: a folder no one can make
        else:
            (tmp_path / "ro").mkdir()
            (tmp_path / "ro").chmod(0o500)
    with pytest.raises(ValueError, match={"empty name": "empty", "a file": "is a file", "unwritable": "cannot write",
                                          "holds files": "f\\b.*never overwrites"}[case]):
        check_out(target)
    assert (tmp_path / "f").read_text() == "data"
    assert check_out(tmp_path / "new") == tmp_path / "new" and (tmp_path / "new").is_dir()


def test_missing_dir_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"records\.json.*normlab run --out"):
        rebuild(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must hold"),
        ('{"meta": {}, "records": [{"name": "x"}]}', r"lacks \['title'"),
    ],
)
def test_bad_json_names_the_file(tmp_path, text, match):
    (tmp_path / "records.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as err:
        load_records(tmp_path)
    assert str(tmp_path / "records.json") in str(err.value)


@pytest.mark.parametrize(
    "records, match",
    [
        ([_bare(), _bare()], "two records are named 'bare'"),
        ([{**_bare(), "name": "a/b"}], "named 'a/b'"),
        ([{**_bare(), "verdict": True}], "needs verdict"),
    ],
)
def test_write_report_rejects_bad_records(tmp_path, records, match):
    with pytest.raises(ValueError, match=match):
        write_report(records, tmp_path)


@pytest.mark.parametrize("break_it, says", [
    (lambda r: r["checks"][0].pop("value"), "checks[0] has no value"),
    (lambda r: r.__setitem__("checks", "oops"), "checks must be a list"),
    (lambda r: r["checks"][0].__setitem__("value", "0.5"), "checks[0].value must be a number"),
    (lambda r: r["checks"][0].__setitem__("ci", [0.1]), "checks[0].ci must be"),
    (lambda r: r["checks"][0].__setitem__("status", "maybe"), "checks[0].status must be one of"),
    (lambda r: r["tables"][0].pop("columns"), "tables[0] must be"),
    (lambda r: r["tables"][0]["rows"].append([1]), "tables[0].rows"),
    (lambda r: r["figures"][0].pop("panels"), "figures[0] must be"),
    (lambda r: r.__setitem__("notes", [1, 2]), "notes must be"),
    (lambda r: r.__setitem__("title", 7), "title must be text"),
])
def test_report_on_a_malformed_records_file_names_the_field_and_exits_2(tmp_path, capsys, break_it, says):
    from normlab.cli import main

    write_report(RECORDS, tmp_path, meta=META)
    data = json.loads((tmp_path / "records.json").read_text())
    rec = next(r for r in data["records"] if r.get("tables") and r.get("figures"))
    break_it(rec)
    (tmp_path / "records.json").write_text(json.dumps(data))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"experiment {rec['name']!r}" in err and says in err, err


def _paths(obj, at=()):
    """Every place in a JSON value: (path, value), depth first."""
    yield at, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, at + (k,))


_SMALL = _record("small", "A small record", "a claim", [check("ratio", [1.0, 1.2, 0.9], ">", 0.5)],
                 params={"epochs": 2}, tables=[table("t", ["a", "b"], [["x", 1.0]])],
                 figures=[figure("f", panel("lines", "p", series=[series("s", [0, 1], [1.0, 2.0])]))],
                 notes=["n"], seconds=0.1)


@pytest.mark.parametrize("wrong", [None, "oops", 7, [], {}, [1], [{}]], ids=repr)
def test_report_survives_any_field_of_a_record_replaced(tmp_path, capsys, wrong):
    """Every field of a record, replaced by a value of the wrong kind: `normlab report` draws the
    page (exit 0) or says in one line which field of which experiment is wrong (exit 2)."""
    from normlab.cli import main

    write_report([_SMALL], tmp_path, meta=META, page=False)
    good = json.loads((tmp_path / "records.json").read_text())
    for path, _ in list(_paths(good["records"][0])):
        if not path or (path[0] == "figures" and wrong not in (None, "oops", [])):  # drawing is slow: a few there
            continue
        data = json.loads(json.dumps(good))
        parent = data["records"][0]
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = wrong
        (tmp_path / "records.json").write_text(json.dumps(data))
        code = main(["report", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), (path, wrong)
        assert code == 0 or (len(err.splitlines()) == 1 and ("'small'" in err or "record 0" in err) and "Traceback" not in err), (path, err)


def test_reference_levels_are_drawn_and_stretch_the_axis():
    fig = figure("f", panel("bars", "p", logy=True, labels=["a"], values=[1e-7],
                            refs=[{"y": 1e-5, "label": "threshold"}, {"y": "not a number"}, "junk"]))
    assert render_figure(fig)[:8] == PNG_SIGNATURE
    import matplotlib.pyplot as plt
    from normlab.lab.report import _draw_panel

    ax = plt.figure().add_subplot()
    _draw_panel(ax, fig["panels"][0])
    lo, hi = ax.get_ylim()
    assert lo < 1e-7 and hi > 1e-5  # a value near 1e-7 is seen against the 1e-5 threshold
    plt.close("all")
