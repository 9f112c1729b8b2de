"""A fast real systemd to measure: boot a root tree with ``systemd-nspawn -b`` (about a second).

Used by the tests and the benchmark; the container's bus is then reached through
``/proc/PID/root/run/dbus/system_bus_socket`` (``open_transport(container=...)``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import BootimgError


class ContainerBoot:
    def __init__(self, proc: subprocess.Popen, root: Path, log: Path):
        self.proc, self.root, self.log = proc, root, log
        self.pid: int | None = None  # the container's init, as a host PID

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command inside the container (nsenter into all its namespaces)."""
        assert self.pid is not None
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], capture_output=True, text=True,
                              timeout=timeout)


def _init_pid(nspawn_pid: int) -> int | None:
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@contextlib.contextmanager
def booted(root: str | os.PathLike[str], *, args: Sequence[str] = (), kernel_args: Sequence[str] = (),
           timeout: float = 60, log: str | os.PathLike[str] | None = None,
           wait_finished: bool = True) -> Iterator[ContainerBoot]:
    """Boot ``root`` in systemd-nspawn (not registered with machined, in our own scope), wait until
    its system bus is up (and its boot finished), yield it, then power it off."""
    if shutil.which("systemd-nspawn") is None:
        raise BootimgError("systemd-nspawn not found (Debian: systemd-container)")
    root = Path(root)
    log_path = Path(log) if log else root.parent / f"{root.name}.nspawn.log"
    argv = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-b", "-D", str(root), *args, *kernel_args]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    boot = ContainerBoot(proc, root, log_path)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BootimgError(f"systemd-nspawn exited with {proc.returncode}: see {log_path}")
            pid = _init_pid(proc.pid)
            if pid and Path(f"/proc/{pid}/root/run/dbus/system_bus_socket").exists():
                boot.pid = pid
                if not wait_finished:
                    break
                r = boot.run("systemctl", "show", "-p", "FinishTimestampMonotonic", "--value", timeout=10)
                if r.returncode == 0 and r.stdout.strip() not in ("", "0"):
                    break
            time.sleep(0.05)
        else:
            raise BootimgError(f"the container did not finish booting within {timeout:.0f} s: see {log_path}")
        yield boot
    finally:
        _stop(boot)


def _stop(boot: ContainerBoot) -> None:
    proc = boot.proc
    if proc.poll() is None and boot.pid:
        with contextlib.suppress(Exception):
            boot.run("systemctl", "poweroff", "--no-block", timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # nspawn: SIGTERM -> container's poweroff
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
