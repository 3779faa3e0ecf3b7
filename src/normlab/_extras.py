"""Which optional extras are installed: the library needs none, the lab and plots need ``lab``."""

from __future__ import annotations

import importlib

LAB = ("matplotlib", "rich")


def missing(*modules: str) -> list[str]:
    """The ``modules`` that cannot be imported here."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def lab_message(command: str, modules=LAB) -> str | None:
    """One line for ``command`` when the lab extra is missing (None when it is installed)."""
    gone = missing(*modules)
    if not gone:
        return None
    return (f"normlab {command}: needs the lab extra ({', '.join(gone)} "
            f"{'is' if len(gone) == 1 else 'are'} not installed); pip install 'normlab[lab]'")
