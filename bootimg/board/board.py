"""The board as one object: ``prepare()`` (root + kernel + initramfs, all cached) and the
plain-ext4 baseline boot built on it."""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .. import arch as archmod
from ..host import HostError, Log, cache_dir, scratch_dir, stderr_log
from ..vm import qemu
from ..vm.qemu import DEFAULT_TIMEOUT, BootResult, Machine, check_qemu
from .disk import LABEL, DiskImage, make_disk
from .initramfs import DEFAULT_DRIVERS, BootFiles, build_initramfs
from .rootfs import MARKER, POWEROFF_ARG, Rootfs, RootfsSpec, build_rootfs, extract_rootfs

BOARD_MARKER = re.compile(re.escape(MARKER) + r".*")


def baseline_cmdline(extra: str = "", *, root: str = f"LABEL={LABEL}", poweroff: bool = True,
                     console: str = archmod.X86_64.console) -> str:
    """The board's direct-boot kernel command line: ext4 root by label, read-write, serial
    console (``console``: the machine's, ``Arch.console``), reboot (i.e. QEMU exit, with
    -no-reboot) on panic, power off after the marker."""
    parts = [f"root={root}", "rw", f"console={console}", "panic=-1"]
    if poweroff:
        parts.append(POWEROFF_ARG)
    if extra:
        parts.append(extra)
    return " ".join(parts)


@dataclass(frozen=True)
class Board:
    """A prepared board: the cached root tarball and the kernel + initramfs built from it."""

    rootfs: Rootfs
    boot_files: BootFiles | None        # None: prepared without the baseline's initramfs
    cache: Path

    @property
    def baseline(self) -> BootFiles:
        if self.boot_files is None:
            raise HostError("this board was prepared without its baseline kernel + initramfs")
        return self.boot_files

    @property
    def kernel(self) -> Path:
        return self.baseline.kernel

    @property
    def initrd(self) -> Path:
        return self.baseline.initrd

    @property
    def kver(self) -> str:
        return self.rootfs.kver

    @property
    def cached(self) -> bool:
        return self.rootfs.cached and (self.boot_files is None or self.boot_files.cached)


def prepare(spec: RootfsSpec | None = None, *, cache: str | os.PathLike[str] | None = None,
            add_modules: Sequence[str] = (), module_dirs: Sequence[str | os.PathLike[str]] = (),
            add_drivers: Sequence[str] = DEFAULT_DRIVERS, compress: str | None = None,
            dracut_args: Sequence[str] = (), tree_files: Mapping[str, str | os.PathLike[str]] | None = None,
            initramfs: bool = True, rebuild: bool = False, log: Log = stderr_log) -> Board:
    """Build (or reuse from the cache) the root filesystem and the kernel + initramfs.

    ``add_modules``/``module_dirs``/``tree_files`` extend the initramfs (see
    ``initramfs.build_initramfs``); the root tarball is shared by all variants. Without
    ``initramfs`` only the root is prepared (a release makes its own initramfs)."""
    cdir = cache_dir(cache)
    rootfs = build_rootfs(spec, cache=cdir, rebuild=rebuild, log=log)
    boot_files = None
    if initramfs:
        boot_files = build_initramfs(rootfs, cache=cdir, add_modules=add_modules, module_dirs=module_dirs,
                                     add_drivers=add_drivers, compress=compress, dracut_args=dracut_args,
                                     tree_files=tree_files, rebuild=rebuild, log=log)
    return Board(rootfs, boot_files, cdir)


def boot(kernel: str | os.PathLike[str], initrd: str | os.PathLike[str] | None, disk: str | os.PathLike[str] | None,
         append: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
         serial_log: str | os.PathLike[str] | None = None, snapshot: bool = True,
         extra_args: Sequence[str] = (), arch: archmod.Arch = archmod.X86_64) -> BootResult:
    """A direct kernel boot on the board: ready is the board root's marker line, and the boot
    waits for the poweroff the marker unit does when ``append`` asks for it (the default
    command line, ``baseline_cmdline()``, does)."""
    cmdline = append if append is not None else baseline_cmdline(console=arch.console)
    machine = Machine(disk=Path(disk) if disk else None, kernel=Path(kernel), initrd=Path(initrd) if initrd else None,
                      append=cmdline, snapshot=snapshot, extra_args=tuple(extra_args), arch=arch)
    return qemu.boot(machine, timeout=timeout, serial_log=serial_log, marker=BOARD_MARKER,
                     powers_off=POWEROFF_ARG in cmdline.split())


@dataclass
class BaselineRun:
    """The boots of one baseline run (same disk image, each boot on a throw-away overlay)."""

    results: list[BootResult]
    disk: DiskImage
    seconds_disk: float
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def median(self, what: str = "total") -> float | None:
        """Median of a marker field (kernel, initrd, userspace, total) over the ready boots, or
        of the host time to the marker with ``what="host"``."""
        values = [r.duration if what == "host" else r.startup.get(what)
                  for r in self.results if r.ok]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def boot_baseline(board: Board, *, times: int = 1, timeout: float = DEFAULT_TIMEOUT,
                  append: str | None = None, work_dir: str | os.PathLike[str] | None = None,
                  serial_logs: str | os.PathLike[str] | None = None, keep: bool = False,
                  on_result: Callable[[int, BootResult], None] | None = None,
                  log: Log = stderr_log) -> BaselineRun:
    """Boot the plain ext4 baseline ``times`` times: the root tree itself is the disk.

    ``append`` replaces the default command line (``baseline_cmdline()``); ``serial_logs`` is a
    directory that gets ``boot-N.log`` per boot. The disk is made in a scratch directory (under
    ``work_dir``, default the cache) and removed afterwards unless ``keep``."""
    arch = board.rootfs.target
    check_qemu(arch.qemu)
    parent = Path(work_dir) if work_dir else board.cache / "work"
    results: list[BootResult] = []
    with scratch_dir(parent, "baseline-", keep=keep) as work:
        t0 = time.monotonic()
        tree = extract_rootfs(board.rootfs, work / "tree")
        disk = make_disk(work / "baseline.img", tree, seed=f"baseline-{board.rootfs.key}")
        seconds_disk = time.monotonic() - t0
        log(f"baseline disk {disk.size // 2**20} MiB ({disk.content_bytes // 2**20} MiB of files) "
            f"in {seconds_disk:.1f} s")
        for i in range(1, times + 1):
            serial = Path(serial_logs) / f"boot-{i}.log" if serial_logs else None
            result = boot(board.kernel, board.initrd, disk.path, append, timeout=timeout, serial_log=serial, arch=arch)
            results.append(result)
            if on_result:
                on_result(i, result)
        if keep:
            log(f"kept the work directory {work}")
    return BaselineRun(results, disk, seconds_disk)
