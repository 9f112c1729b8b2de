"""The example system on the board: ``manifests/board.yaml`` (the example containers on the
board's Debian root) through the general path, plus what only the test rig needs.

    system = prepare_system("manifests/board.yaml", build_dir="build", key="build/keys/release-2026.key")
    boot(system.machine(), marker=BOARD_READY)

In data-flow order:

1. ``board.prepare()``: the cached Debian root tarball; ``ensure_tree`` extracts it where the
   manifest's ``rootfs.source.path`` points (``build/board/rootfs``; an arm64 board's is
   ``build/board-arm64/rootfs``, ``manifests/board-arm64.yaml``) and writes the machine ssh
   client's public key next to it (``build/board/authorized_keys``, an ``add_files`` source);
2. ``bootimg build`` (``pipeline.build``) makes the signed release in ``build/board/release``;
3. ``bootimg initramfs`` (``disk.initramfs.build_initramfs``): dracut in the release's own root;
4. ``bootimg disk`` (``disk.image.make_disk``): the GPT disk (ESP + data partition);
5. test-rig only: the disk's first boot provisions it (the hook enables fs-verity on every image
   and object, writes kept); the provisioned disk is cached by its inputs, so tests and benches
   start from it. Later boots use ``-snapshot`` or a private copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import arch as archmod
from ..disk.image import DiskOptions, DiskResult, make_disk
from ..disk.initramfs import BootFiles, build_initramfs
from ..host import HostError, Log, cache_used, digest, file_lock, prune_cache, remove_tree, run, stderr_log, write_json_atomically
from ..release.layout import ROOT_IMAGE_NAME, ReleaseDir
from ..vm.qemu import BootResult, Machine, Run
from ..vm.session import authorized_keys
from .board import Board, prepare
from .disk import DEFAULT_EPOCH, LABEL, DiskImage
from .disk import make_disk as make_plain_disk
from .rootfs import MARKER, RootfsSpec, extract_rootfs

DISK_FORMAT = 2                  # bump when provisioning or the disk's layout changes
CACHED_DISKS = 12                # provisioned disks kept beyond those of the last hours (host.prune_cache)
BOARD_READY = re.compile(re.escape(MARKER) + r".*")


@dataclass
class System:
    """A release on a provisioned board disk, ready to boot."""

    board: Board
    boot_files: BootFiles            # kernel + initramfs from the release's root
    release_dir: Path
    release: dict                    # release.json
    disk: Path                       # the provisioned disk (boot it with snapshot=True or a copy)
    disk_result: DiskResult
    manifest_path: Path
    tree: Path                       # the extracted board root (the manifest's rootfs source)
    provisioning: BootResult | None = None
    timings: dict = field(default_factory=dict)

    @property
    def kernel(self) -> Path:
        return self.boot_files.kernel

    @property
    def initrd(self) -> Path:
        return self.boot_files.initrd

    @property
    def digest(self) -> str:
        """The root image's fs-verity digest (hex), as release.json records it."""
        return self.release["root"]["digest"]

    @property
    def cmdline(self) -> str:
        """The kernel command line of the disk's boot entry."""
        return self.disk_result.cmdline

    @property
    def arch(self) -> archmod.Arch:
        """The architecture of the release's root (what ``bootimg disk`` found in it)."""
        return archmod.by_name(self.disk_result.arch)

    def machine(self, disk: Path | None = None, **kw) -> Machine:
        """The UEFI machine: firmware -> the disk's systemd-boot -> the release's entry."""
        return Machine(disk=disk or self.disk, arch=self.arch, **kw)

    def direct(self, extra: str = "", *, disk: Path | None = None, initrd: Path | None = None, **kw) -> Machine:
        """The same boot without firmware and loader: QEMU loads the kernel and initramfs and gives
        the entry's command line plus ``extra`` (test-harness arguments the entry cannot carry)."""
        append = " ".join(a for a in (self.cmdline, extra) if a)
        return Machine(disk=disk or self.disk, kernel=self.kernel, initrd=initrd or self.initrd, append=append,
                       arch=self.arch, **kw)


def board_dir(build: Path, arch: str = archmod.X86_64.name) -> Path:
    """Where a board's root and outputs go under ``build``: ``board`` (amd64), ``board-arm64``."""
    return build / ("board" if arch == archmod.X86_64.name else f"board-{arch}")


def ensure_tree(board: Board, build: Path, *, log: Log = stderr_log) -> Path:
    """The board root extracted at ``build/board/rootfs`` (re-extracted when the root changes),
    plus ``build/board/authorized_keys`` (``board-arm64`` for an arm64 board)."""
    top = board_dir(build, board.rootfs.arch)
    top.mkdir(parents=True, exist_ok=True)
    tree = top / "rootfs"
    stamp = top / "rootfs.key"
    if not (tree.is_dir() and stamp.is_file() and stamp.read_text().strip() == board.rootfs.key):
        if tree.exists():
            remove_tree(tree)
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        extract_rootfs(board.rootfs, tree)
        stamp.write_text(board.rootfs.key + "\n")
        log(f"extracted the board root to {tree} in {time.monotonic() - t0:.1f} s")
    keys = top / "authorized_keys"
    want = authorized_keys()
    if not keys.is_file() or keys.read_text() != want:
        keys.write_text(want)
    install_device_tools(tree)
    return tree


def install_device_tools(tree: Path) -> None:
    """bootimg's Python package (pure Python: its C modules are optional) and a ``bootimg``
    command in the board root, for `bootimg install/gc/status` on the device (Debian's python3
    and python3-cryptography are in the root). What a product would package for its root."""
    package = Path(__file__).resolve().parent.parent
    dest = tree / "usr/lib/python3/dist-packages/bootimg"
    launcher = tree / "usr/bin/bootimg"
    # The same bytes and times for the same package: the root image's digest must not follow the
    # checkout's directory times (a __pycache__ made by an import changes its directory's).
    parents = {d: d.stat() for d in (dest.parent, launcher.parent) if d.is_dir()}
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(package, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "*.o"))
    launcher.write_text("#!/usr/bin/python3\nimport sys\n\nfrom bootimg.cli import main\n\nsys.exit(main())\n")
    launcher.chmod(0o755)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or DEFAULT_EPOCH)
    for path in [launcher, dest, *dest.rglob("*")]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    for d, st in parents.items():
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def provision(system: System, *, timeout: float = 900.0, serial_log: Path | None = None) -> BootResult:
    """Boot the fresh disk once with its writes kept: the hook enables fs-verity on the release
    (its first boot); then a clean ACPI shutdown."""
    run = Run(system.machine(snapshot=False), marker=BOARD_READY, serial_log=serial_log)
    try:
        run.watch(timeout=timeout, stay_up=True)
        result = run.result()
        if result.ok and not run.powerdown(120):
            raise HostError("the provisioning boot did not power off after the marker")
    finally:
        run.stop()
    result = run.result()
    if not result.ok:
        raise HostError(f"the provisioning boot failed: {result.summary()}"
                        + (f"; console: {serial_log}" if serial_log else ""))
    if "provisioning: enabling fs-verity" not in result.console:
        raise HostError("the provisioning boot did not provision (the disk was provisioned already?)")
    return result


def prepare_system(manifest: str | os.PathLike[str], *, build_dir: str | os.PathLike[str],
                   key: str | os.PathLike[str] | None = None, out_name: str = "release",
                   transform: Callable | None = None, provision_timeout: float = 900.0,
                   spec: RootfsSpec | None = None, baseline: bool | None = None,
                   log: Log = stderr_log) -> System:
    """Build, lay out and provision ``manifest`` for the board (see the module doc).

    ``key``: the release signing key (trust profile ``signed``); ``transform``: a function
    Manifest -> Manifest applied after loading (e.g. drop the containers for a root-only
    benchmark); ``spec``: the board root (default amd64; ``RootfsSpec.for_arch("arm64")``);
    ``baseline``: also prepare the plain baseline's initramfs (default: for the host's own
    architecture, where the baseline comparisons run). Outputs go to ``build_dir/board/``
    (``board-ARCH/`` for another architecture)."""
    from .. import pipeline
    from ..manifest import load_manifest
    from ..signing import SecretKey

    timings: dict[str, float] = {}
    build = Path(build_dir).absolute()
    # A bad manifest fails here, before minutes of board work (its inputs are checked below,
    # once the board root it names is extracted).
    load_manifest(manifest, check_inputs=False, on_warning=None)
    t0 = time.monotonic()
    spec = spec or RootfsSpec()
    board = prepare(spec, initramfs=spec.target.native if baseline is None else baseline, log=log)
    tree = ensure_tree(board, build, log=log)
    timings["board"] = time.monotonic() - t0
    top = board_dir(build, spec.arch)
    t0 = time.monotonic()
    m = load_manifest(manifest, check_inputs=True)
    if transform is not None:
        m = transform(m)
    out = top / out_name
    result = pipeline.build(m, pipeline.BuildOptions(out=out, signing_key=SecretKey.from_file(key) if key else None,
                                                     force=True))
    timings["release"] = time.monotonic() - t0
    log(f"release {out} built in {timings['release']:.1f} s: root {result.release['root']['kernel_argument']}")
    t0 = time.monotonic()
    boot_files = build_initramfs(out, log=log)
    timings["initramfs"] = time.monotonic() - t0
    t0 = time.monotonic()
    disk_path = top / f"{out_name}.disk.raw"
    disk = make_disk(out, disk_path, DiskOptions(boot=boot_files, force=True), log=log)
    timings["disk"] = time.monotonic() - t0
    release = json.loads((out / "release.json").read_text())
    system = System(board, boot_files, out, release, disk_path, disk, Path(manifest), tree, timings=timings)
    # The provisioned disk is cached by what made the fresh one (the same inputs give the same
    # bytes): the release (named completely by release.json + its signature), the initramfs.
    sig = out / "release.json.minisig"
    disk_key = digest({"format": DISK_FORMAT, "release": (out / "release.json").read_text(),
                       "sig": sig.read_text() if sig.exists() else None, "initramfs": boot_files.key,
                       "cmdline": disk.cmdline})
    cached = board.cache / f"disk-{disk_key}.img"
    t0 = time.monotonic()
    with file_lock(board.cache / f".disk-{disk_key}.lock"):
        if cached.is_file():
            cache_used(cached)
            disk_path.unlink(missing_ok=True)
            _copy_disk(cached, disk_path)
            log(f"provisioned disk from the cache ({cached.name})")
        else:
            system.provisioning = provision(system, timeout=provision_timeout,
                                            serial_log=top / f"{out_name}.provision.log")
            timings["provision_boot"] = time.monotonic() - t0
            log(f"provisioned {disk_path.name} in {timings['provision_boot']:.0f} s "
                f"({system.provisioning.summary()})")
            tmp = cached.with_name(f".{cached.name}.tmp")
            _copy_disk(disk_path, tmp)
            os.replace(tmp, cached)
            prune_cache(board.cache, "disk-", ".img", keep=CACHED_DISKS, log=log)
    timings["disk_total"] = time.monotonic() - t0
    write_json_atomically(top / f"{out_name}.system.json", {
        "release": str(out), "digest": system.digest, "disk": str(disk_path), "cmdline": disk.cmdline,
        "kernel": str(system.kernel), "initrd": str(system.initrd), "initrd_size": boot_files.initrd_size,
        "timings": {k: round(v, 1) for k, v in timings.items()}})
    return system


def copy_disk(system: System, dest: Path) -> Path:
    """A private copy of the provisioned disk (sparse, reflinked where possible) to tamper with."""
    return _copy_disk(system.disk, dest)


def _copy_disk(src: Path, dest: Path) -> Path:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)], what=f"copying the disk {src.name}")
    return dest


def container_masks(system: System) -> list[str]:
    """``systemd.mask=`` arguments for every boot-time container and its image service, and the
    boot assessment that needs them: boots that compare the root alone (composefs against plain
    ext4) leave the containers out."""
    from ..manifest.reserved import BLESS_TIMER

    names = sorted(name for name, entry in system.release["images"].items() if entry["role"] == "container")
    return [f"systemd.mask={unit}" for n in names for unit in (f"{n}.service", f"bootimg-image-{n}.service")] + \
        [f"systemd.mask={BLESS_TIMER}"]


def materialize_root(system: System, dest: Path) -> Path:
    """The release's root image as a plain directory tree: mounted the composefs way on the host
    (EROFS + overlay, the objects as data-only layer; no fs-verity here, so no ``verity=``) and
    copied out with owners, modes, xattrs and times. What the plain ext4 baseline boots."""
    import tempfile

    dest = Path(dest)
    if dest.exists():
        remove_tree(dest)
    with tempfile.TemporaryDirectory(prefix="bootimg-root-") as tmp:
        meta, mnt = Path(tmp) / "meta", Path(tmp) / "root"
        meta.mkdir()
        mnt.mkdir()
        rel = ReleaseDir(system.release_dir)
        run(["mount", "-t", "erofs", "-o", "loop,ro", str(rel.image_path(ROOT_IMAGE_NAME)), str(meta)],
            what="mounting the root image")
        try:
            run(["mount", "-t", "overlay", "composefs", "-o",
                 f"ro,metacopy=on,redirect_dir=on,lowerdir={meta}::{rel.objects}", str(mnt)],
                what="mounting the composefs root")
            try:
                dest.mkdir(parents=True)
                # cp -a = --preserve=all: owners, modes, times, xattrs (security.capability ...)
                run(["cp", "-a", f"{mnt}/.", str(dest)], what="copying the root out")
            finally:
                run(["umount", str(mnt)], what="unmounting the composefs root")
        finally:
            run(["umount", str(meta)], what="unmounting the root image")
    return dest


def baseline_disk(system: System, image: Path, work: Path) -> DiskImage:
    """The same root filesystem on plain ext4 (no composefs, no fs-verity) for comparison."""
    tree = materialize_root(system, work)
    try:
        return make_plain_disk(image, tree, label=LABEL, seed="board-baseline")
    finally:
        remove_tree(tree)


# What the integrity floor leaves without fs-verity: what the booted system writes in place
# (a file with fs-verity is read-only), as composefs keeps /var on the data partition.
FLOOR_WRITABLE = ("/var", "/etc/machine-id")
# Run by the guest's python3 (the board root has it, and bootimg's package): fs-verity on every
# regular file of the root filesystem but FLOOR_WRITABLE, one process.
_ENABLE_ALL = r"""
import errno, os, sys
from bootimg.composefs.fsverity import enable_fd
skip, dev, done, busy = set(sys.argv[1:]), os.lstat("/").st_dev, 0, 0
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip and os.lstat(os.path.join(top, d)).st_dev == dev]
    for name in files:
        path = os.path.join(top, name)
        if path in skip or not os.path.isfile(path) or os.path.islink(path):
            continue
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            enable_fd(fd)
            done += 1
        except OSError as err:
            if err.errno == errno.ETXTBSY:
                busy += 1
            elif err.errno != errno.EEXIST:
                sys.exit(f"{path}: {err.strerror}")
        finally:
            os.close(fd)
os.sync()
print(f"enabled {done} busy {busy}")
"""


def integrity_floor_disk(system: System, image: Path, work: Path) -> tuple[DiskImage, int]:
    """The baseline disk with fs-verity enabled on every regular file but FLOOR_WRITABLE: the
    cost of fs-verity's own hashing on every read, without composefs (the floor a verified root
    cannot go below). Enabled by the guest's kernel in one boot of the disk with its writes kept
    (the build host's kernel need not have fs-verity). (disk, files enabled)."""
    from ..vm.session import running

    disk = baseline_disk(system, image, work)
    with running(baseline_machine(system, disk.path, snapshot=False), marker=BOARD_READY, timeout=900) as vm:
        if not vm.result.ok:
            raise HostError(f"the floor disk's preparing boot failed: {vm.result.summary()}")
        out = vm.run("python3", "-", *FLOOR_WRITABLE, input=_ENABLE_ALL, timeout=1800).stdout
    m = re.search(r"enabled (\d+) busy (\d+)", out)
    if m is None:
        raise HostError(f"enabling fs-verity in the floor disk's guest said {out!r}")
    return disk, int(m.group(1))


def baseline_machine(system: System, disk: Path, extra: str = "", *, initrd: Path | None = None, **kw) -> Machine:
    """A direct boot of the plain ext4 root: the board's baseline initramfs (or ``initrd``), the
    entry's kernel arguments but root= the plain disk, without the containers (they run from the
    release)."""
    from .board import baseline_cmdline

    args = [a for a in system.cmdline.split() if not a.startswith(("root=", "composefs.", "bootimg.release="))
            and a != "rw"]
    append = baseline_cmdline(" ".join([*args, *container_masks(system), *([extra] if extra else [])]),
                              poweroff=False, console=system.arch.console)
    return Machine(disk=disk, kernel=system.kernel, initrd=initrd or system.board.initrd, append=append, arch=system.arch,
                   **kw)
