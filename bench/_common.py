"""Shared by the benchmark scripts: run a child process, measure it."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, from wait4's rusage) of one child process; exits with its
    stderr if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024
