"""Shared by the benchmark scripts: run a child process, measure it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import NamedTuple


class Measured(NamedTuple):
    wall: float         # seconds
    rss: float          # peak RSS, MB
    disk_mb: float      # read from storage (not the page cache), MB: > 0 means "not warm"


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Measured:
    """Wall seconds, peak RSS and storage reads (wait4's rusage) of one child process; exits
    with its stderr if it fails.

    The disk figure matters on these VMs: DAMON pages cold page-cache out in the background,
    so a tree read a minute ago may be partly read from disk again."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return Measured(wall, usage.ru_maxrss / 1024, usage.ru_inblock * 512 / 1e6)
