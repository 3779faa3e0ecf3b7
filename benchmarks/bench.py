"""The benchmark suite: ``python benchmarks/bench.py [ARGS]`` is ``normlab bench [ARGS]``.

The code lives in :mod:`normlab.bench` so that the installed command runs it too.
"""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
