"""What bootimg's osbuild stages (``osbuild/org.bootimg.*``) run, as a library.

The stage files are thin: they run with the build root's own ``python3``, check that bootimg
is importable there (and new enough: ``API``), and call ``build.run`` or ``disktree.run``
with the arguments osbuild gives a stage (``tree``, ``inputs``, ``options``). Every path in the
options is an ``input://`` location of one of the stage's inputs (``locations.py``); inside
osbuild's sandbox no host path exists. Nothing here imports osbuild.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

API = 1
"""The contract between the stage files and this package; a stage file needs at least its own."""


def main(stage: str, run: Callable[..., Any], args: Mapping[str, Any],
         metadata: Callable[[dict], None] | None = None) -> int:
    """Run a stage's ``run(args, metadata)``: 0, or 1 with each problem on one line of stderr
    (``STAGE: ...``), as the bootimg CLI reports them; no traceback for the user's errors."""
    from ..errors import BootimgError

    try:
        run(args, metadata)
    except BootimgError as err:
        for line in str(err).splitlines():
            print(f"{stage}: {line}", file=sys.stderr)
        return 1
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"{stage}: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0
