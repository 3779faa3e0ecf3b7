"""The ``normlab`` command line (also ``python -m normlab``).

``normlab --version`` prints the version; ``normlab list`` lists what normlab provides.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _catalogue() -> list[tuple[str, list[tuple[str, str]]]]:
    from . import functional, nn, preprocessing

    def first_line(obj) -> str:
        doc = (obj.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    sections = []
    for title, mod in (("normlab.nn", nn), ("normlab.functional", functional), ("normlab.preprocessing", preprocessing)):
        sections.append((title, [(name, first_line(getattr(mod, name))) for name in mod.__all__]))
    return sections


def _list(_args: argparse.Namespace) -> int:
    for title, rows in _catalogue():
        print(title)
        width = max(len(name) for name, _ in rows)
        for name, summary in rows:
            print(f"  {name:<{width}}  {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: exact, fast normalization layers for PyTorch, and a lab of experiments.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", help="list the layers, ops and scalers normlab provides")
    p.set_defaults(func=_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
