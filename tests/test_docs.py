"""Every public name documents itself as torch.nn's do: a summary, Args, an example that runs."""

import doctest
import importlib
import inspect
import re

import pytest

MODULES = ["normlab.nn", "normlab.functional", "normlab.preprocessing", "normlab.convert", "normlab.diagnostics",
           "normlab.distributed"]
PUBLIC = [(m, n) for m in MODULES for n in importlib.import_module(m).__all__
          if callable(getattr(importlib.import_module(m), n))]


def _doc(obj) -> str:
    return inspect.getdoc(obj) or ""


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_summary_args_and_a_passing_example(module, name):
    obj = getattr(importlib.import_module(module), name)
    doc = _doc(obj)
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith(".") and not re.search(r"``|:[a-z]+:`|\\\*", summary), f"summary: {summary!r}"
    params = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    if params:
        assert re.search(r"^(Args:|Parameters\n-+)", doc, flags=re.M), "no Args section"
    if module in ("normlab.nn", "normlab.functional", "normlab.preprocessing") and name != "remove_weight_norm":
        assert "Lesson 14.1" in doc or "survey" in doc or re.search(r"\b(19|20)\d\d\b", doc), "no source"
    globs = dict(vars(inspect.getmodule(obj)))  # the defining module's, as pytest's --doctest-modules runs them
    tests = [t for t in doctest.DocTestFinder().find(obj, name, globs=globs) if t.examples and t.name == name]
    assert tests, "no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{runner.failures} failing example(s)"


def test_normlab_list_is_plain_text_one_line_per_name(capsys):
    from normlab.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"``|:[a-z]+:`|\\\*", out)
    for module, name in PUBLIC:
        assert re.search(rf"^  {re.escape(name)} +\S.*\.$", out, flags=re.M), name
    assert "normlab.convert" in out and "normlab.diagnostics" in out and "\n  _" not in out
