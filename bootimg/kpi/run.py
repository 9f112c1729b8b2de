"""Boot a target N times and collect each boot: a disk under QEMU, a rig over ssh, or a container.

Labels: the first boot measured is ``first`` (caches, first-boot work: judge it with care);
later boots are ``cold`` when the machine was started from power-off (a new QEMU process, a new
container) and ``warm`` when it was rebooted (``ssh reboot`` on a rig).

Each boot is collected only once it has *finished* (``FinishTimestampMonotonic`` set): a
finished boot's numbers do not change any more.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from ..errors import BootimgError
from .collect import collect
from .history import with_journal
from .model import BootRecord
from .transport import MANAGER_PATH, Transport, TransportError, open_transport

Log = Callable[[str], None]


def wait_finished(transport: Transport, timeout: float = 120.0, poll: float = 0.25) -> None:
    """Poll the manager until the boot has finished (exit 2 if it does not within ``timeout``)."""
    deadline = time.monotonic() + timeout
    jobs = None
    while True:
        m = transport.get_all_many([MANAGER_PATH])[0]
        if int(m.get("FinishTimestampMonotonic") or 0) > 0:
            return
        jobs = m.get("NJobs")
        if time.monotonic() > deadline:
            raise TransportError(f"{transport.describe()}: boot not finished within {timeout:.0f} s "
                                 f"(FinishTimestampMonotonic=0, {jobs} jobs running)")
        time.sleep(poll)


# Each booter is a function (index) -> context manager yielding (transport, label kind, info).
Booter = Callable[[int], ContextManager[tuple[Transport, str, dict]]]


def run_boots(times: int, booter: Booter, units: Sequence[str], *, containers: Sequence[tuple[str, str]] = (),
              finish_timeout: float = 180.0, log: Log = lambda s: None) -> list[BootRecord]:
    if times < 1:
        raise BootimgError("--times must be at least 1")
    records: list[BootRecord] = []
    for i in range(1, times + 1):
        with booter(i) as (transport, kind, info):
            try:
                wait_finished(transport, finish_timeout)
                rec = collect(transport, units, label="first" if i == 1 else kind, containers=containers)
                rec = with_journal(rec, lambda argv: transport.run(argv))
            finally:
                transport.close()
        rec.system.update(info)
        records.append(rec)
        log(f"boot {i}/{times} ({rec.label}) {(rec.boot_id or '?')[:12]}: "
            f"{(rec.analyze_time or 'not finished').splitlines()[0]} [collected in {rec.collect_seconds:.3f} s]")
    return records


# -- booters ----------------------------------------------------------------------------------

def qemu_booter(machine, *, timeout: float = 600.0, serial_dir: Path | None = None, via: str = "auto",
                log: Log = lambda s: None) -> Booter:
    """Each boot is a new QEMU process of ``machine`` (a ``bootimg.vm.Machine``: a UEFI disk or
    a direct kernel boot) on the same disk (``-snapshot``): a cold boot. Ready is the first ssh
    connection (the system must take the vm client key, ``bootimg.vm.session.authorized_keys``)."""
    from ..vm.session import running

    @contextlib.contextmanager
    def boot(i: int) -> Iterator[tuple[Transport, str, dict]]:
        serial = serial_dir / f"boot-{i}.log" if serial_dir else None
        t0 = time.monotonic()
        try:
            ctx = running(machine.with_(snapshot=True), timeout=timeout, serial_log=serial)
            vm = ctx.__enter__()
        except BootimgError as e:
            raise TransportError(f"qemu: {e}") from None
        try:
            if not vm.result.ok:
                raise TransportError(f"qemu: boot {i} did not come up: {vm.result.summary()}")
            log(f"boot {i}: ssh up after {time.monotonic() - t0:.1f} s (host)")
            transport = open_transport(ssh=vm.host_alias, ssh_config=str(vm.ssh_config), via=via)
            yield transport, "cold", {"host_seconds_to_ready": round(vm.result.duration, 3)}
        except BaseException:
            ctx.__exit__(None, None, None)
            raise
        ctx.__exit__(None, None, None)

    return boot


def container_booter(root: str | os.PathLike[str], *, via: str = "auto", kernel_args: Sequence[str] = (),
                     args: Sequence[str] = ()) -> Booter:
    """Each boot a new systemd-nspawn container of ``root``: a cold boot of userspace only."""
    from . import nspawn

    @contextlib.contextmanager
    def boot(i: int) -> Iterator[tuple[Transport, str, dict]]:
        with nspawn.booted(root, kernel_args=kernel_args, args=args) as c:
            yield open_transport(container=str(c.pid), via=via), "cold", {}

    return boot


def ssh_reboot_booter(host: str, *, ssh_config: str | None = None, ssh_port: int | None = None,
                      via: str = "auto", boot_timeout: float = 600.0) -> Booter:
    """A rig: the first boot is the one it is in; then ``ssh HOST systemctl reboot`` each time (warm)."""
    from .transport import SshPlace

    place = SshPlace(host, ssh_config, ssh_port)

    def boot_id() -> str | None:
        try:
            return (place.read_files(["/proc/sys/kernel/random/boot_id"]).get("/proc/sys/kernel/random/boot_id")
                    or "").strip() or None
        except TransportError:
            return None

    @contextlib.contextmanager
    def boot(i: int) -> Iterator[tuple[Transport, str, dict]]:
        if i > 1:
            before = boot_id()
            with contextlib.suppress(TransportError):
                place.run(["systemctl", "reboot"], timeout=30)
            deadline = time.monotonic() + boot_timeout
            while True:
                now = boot_id()
                if now and now != before:
                    break
                if time.monotonic() > deadline:
                    raise TransportError(f"ssh {host}: did not come back from reboot within {boot_timeout:.0f} s")
                time.sleep(2)
        yield open_transport(ssh=host, ssh_config=ssh_config, ssh_port=ssh_port, via=via), "warm", {}

    return boot
