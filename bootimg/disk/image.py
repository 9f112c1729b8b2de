"""``bootimg disk``: a release on a GPT disk that boots by UEFI, made without root or loop devices.

Partitions::

    1  ESP           FAT32, systemd-boot + the release's boot entry (esp.py)
    2  bootimg-data  ext4 with the verity feature: the shared object store, the release and the
                     state of the boot contract (boot/partition.py, docs/boot-design.md):
                     /bootimg/objects, /bootimg/releases/VERSION, /bootimg/state/var

The tools are the ecosystem's own: ``sfdisk`` for the partition table, ``mke2fs -d`` from a tar
for the data partition, ``mkfs.vfat`` + ``mcopy`` for the ESP, ``qemu-img`` for qcow2. Every
UUID derives from the release, every time from its SOURCE_DATE_EPOCH, so the same release and
options give the same bytes. The file is written under a temporary name and renamed when done.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..boot import loader, partition
from ..composefs.tree import Node
from ..errors import BootimgError
from ..host import Log, need_tools, run, scratch_dir, stderr_log
from ..release import layout
from ..release.description import parse_release
from ..release.layout import ReleaseDir
from . import esp as espmod
from . import fs
from .gpt import DATA_LABEL, ESP_TYPE, SECTOR, Partition, data_partition_offset, partitions
from .initramfs import BootFiles, build_initramfs, root_arch

MiB = fs.MiB
ALIGN = MiB
FORMATS = ("raw", "qcow2")
DEFAULT_HEADROOM = 512 * MiB


@dataclass(frozen=True)
class DiskOptions:
    format: str = "raw"
    size: int | None = None              # the whole disk, bytes (default: content + headroom)
    esp_size: int | None = None
    headroom: int = DEFAULT_HEADROOM     # free space on the data partition (default size)
    uki: bool = False
    secureboot_key: Path | None = None
    secureboot_cert: Path | None = None
    boot: BootFiles | None = None        # kernel + initramfs (default: built from the release)
    force: bool = False


@dataclass
class DiskResult:
    path: Path
    format: str
    size: int
    arch: str
    disk_guid: str
    esp_partuuid: str
    data_partuuid: str
    entry: str
    cmdline: str
    partitions: dict = field(default_factory=dict)
    boot: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"disk": str(self.path), "format": self.format, "size": self.size, "arch": self.arch,
                "disk_guid": self.disk_guid, "esp_partuuid": self.esp_partuuid,
                "data_partuuid": self.data_partuuid, "entry": self.entry, "cmdline": self.cmdline,
                "partitions": self.partitions, "boot": self.boot, "seconds": round(self.seconds, 2)}


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def read_release(rel: ReleaseDir) -> dict:
    try:
        data = rel.release_json.read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read: {err.strerror}", file=str(rel.release_json)) from None
    return parse_release(data, str(rel.release_json))


# What ``mke2fs -d ARCHIVE.tar`` (e2fsprogs 1.47) carries into the file system: other xattrs
# of a tar member are dropped, so they are reported instead of silently lost.
KEPT_XATTRS = frozenset({"security.capability"})


def node_entries(node: Node, prefix: str, rel: ReleaseDir, dropped: list[str] | None = None) -> Iterator[fs.Entry]:
    """The entries of an image subtree (owners, modes, times, xattrs, contents through the
    object store) for the data partition, e.g. the root's /var as the persistent /var.
    ``dropped`` collects ``path (xattr)`` for xattrs the data partition cannot take."""
    first_path: dict[int, str] = {}
    stack = [(prefix, node)]
    while stack:
        path, n = stack.pop()
        t = n.target()
        xattrs = {k.decode("utf-8", "surrogateescape"): v for k, v in sorted(t.xattrs.items())}
        if dropped is not None:
            dropped.extend(f"/{path} ({k})" for k in xattrs if k not in KEPT_XATTRS)
        common = dict(mode=stat.S_IMODE(t.mode), uid=t.uid, gid=t.gid, mtime=t.mtime_sec, xattrs=xattrs)
        if t.is_dir():
            yield fs.Entry(path, "dir", **common)
            stack.extend((f"{path}/{name.decode('utf-8', 'surrogateescape')}", child)
                         for name, child in sorted(t.children.items(), reverse=True))
        elif t.is_reg():
            if n.link_to is not None and id(t) in first_path:
                yield fs.Entry(path, "hardlink", target=first_path[id(t)])
                continue
            first_path[id(t)] = path
            data = rel.read_file(t)
            if data is None:
                raise BootimgError(f"{t.path().decode('utf-8', 'replace')}: its object is missing from the release",
                                   file=str(rel.path))
            yield fs.Entry(path, "file", data=data, **common)
        elif t.is_symlink():
            yield fs.Entry(path, "symlink", target=(t.payload or b"").decode("utf-8", "surrogateescape"), **common)
        elif stat.S_ISCHR(t.mode) or stat.S_ISBLK(t.mode):
            yield fs.Entry(path, "chr" if stat.S_ISCHR(t.mode) else "blk", rdev=t.rdev, **common)
        elif stat.S_ISFIFO(t.mode):
            yield fs.Entry(path, "fifo", **common)


def data_entries(rel: ReleaseDir, release: dict, root: Node, epoch: int,
                 dropped: list[str] | None = None) -> Iterator[fs.Entry]:
    """The data partition (``boot.partition``, docs/boot-design.md): the shared object store
    holding the release's objects, the release beside it, and the initial state."""
    yield fs.Entry(partition.TOP.strip("/"), "dir", 0o755, mtime=epoch)
    yield from fs.host_tree(rel.objects, partition.OBJECTS.strip("/"), mtime=epoch)
    yield fs.Entry(partition.RELEASES.strip("/"), "dir", 0o755, mtime=epoch)
    where = partition.release_path(release["version"]).strip("/")
    yield fs.Entry(where, "dir", 0o755, mtime=epoch)
    for name in (layout.RELEASE_JSON, layout.RELEASE_SIG, layout.SHARING_JSON):
        if (rel.path / name).is_file():
            yield fs.Entry(f"{where}/{name}", "file", 0o644, mtime=epoch, source=rel.path / name)
    yield from fs.host_tree(rel.path / layout.IMAGES_DIR, f"{where}/{layout.IMAGES_DIR}", mtime=epoch)
    state = partition.STATE.strip("/")
    yield fs.Entry(state, "dir", 0o755, mtime=epoch)
    if release.get("boot", {}).get("var") == "persistent":
        var = root.lookup(b"var")
        if var is not None and var.target().is_dir():
            yield from node_entries(var, f"{state}/var", rel, dropped)
        else:
            yield fs.Entry(f"{state}/var", "dir", 0o755, mtime=epoch)


def disk_seed(release: dict) -> str:
    """What a release's disk UUIDs and FAT volume id derive from."""
    return f"bootimg/{release['name']}/{release['root']['digest']}"


def _copy_sparse(src: Path, dst_fd: int, offset: int) -> None:
    """Copy ``src`` into ``dst_fd`` at ``offset``, skipping holes (the images are sparse)."""
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            n = hole - data
            done = 0
            while done < n:
                done += os.copy_file_range(fd, dst_fd, n - done, data + done, offset + data + done)
            pos = hole


def make_disk(release_dir: str | os.PathLike[str], out: str | os.PathLike[str], options: DiskOptions = DiskOptions(),
              *, log: Log = stderr_log) -> DiskResult:
    t_start = time.monotonic()
    if options.format not in FORMATS:
        raise BootimgError(f"unknown disk format {options.format!r} (raw or qcow2)")
    if (options.secureboot_key is None) != (options.secureboot_cert is None):
        raise BootimgError("--secureboot-key and --secureboot-cert go together")
    if options.secureboot_key is not None and not options.uki:
        raise BootimgError("Secure Boot signing is for a UKI: add --uki")
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not options.force:
            raise BootimgError("already exists (use --force to replace it)", file=str(out))
        if not out.is_file() or out.is_symlink():
            raise BootimgError("exists and is not a regular file; refusing to replace it", file=str(out))
    need_tools("sfdisk", "mkfs.vfat", "mcopy", "mke2fs", *(["qemu-img"] if options.format == "qcow2" else []))
    rel = ReleaseDir(release_dir)
    release = read_release(rel)
    root = rel.load_image(release["root"]["image"]).root
    arch = root_arch(rel, root)
    boot = options.boot or build_initramfs(rel.path, log=log)
    if boot.arch != arch.name:
        raise BootimgError(f"the kernel and initramfs are for {boot.arch}, the release's root is {arch.name}")
    if options.uki and release.get("trust") != "sealed":
        log("note: a UKI seals composefs.digest= into a signed image; with trust 'signed' the release "
            "signature is checked as well")
    epoch = int(release["source_date_epoch"])
    seed = disk_seed(release)
    disk_guid, esp_uuid, data_uuid = (fs.seeded_uuid(f"{seed}/{p}") for p in ("disk", "esp", "data"))
    cmdline = loader.kernel_cmdline(release, data_uuid, partition.release_path(release["version"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out.parent, f".{out.name}.tmp-") as work:
        # -- the ESP ----------------------------------------------------------------------
        tree = work / "esp"
        sd_boot_from, payload = espmod.write_tree(tree, work, rel, release, root, arch, boot, cmdline, uki=options.uki,
                                                  secureboot_key=options.secureboot_key,
                                                  secureboot_cert=options.secureboot_cert)
        # Room for two more kernels + initramfs (the next release while this one stays bootable).
        esp_size = options.esp_size or max(128 * MiB, _align(3 * payload + 32 * MiB))
        esp_img = work / "esp.img"
        fs.vfat_from_dir(tree, esp_img, esp_size, label="ESP", seed=f"{seed}/esp", epoch=epoch)

        # -- the data partition -------------------------------------------------------------
        archive = work / "data.tar"
        dropped: list[str] = []
        content, count = fs.write_tar(data_entries(rel, release, root, epoch, dropped), archive)
        if dropped:
            log(f"note: {len(dropped)} xattrs of the root's /var are not carried into the data partition's initial "
                f"/var (mke2fs from a tar keeps only {', '.join(sorted(KEPT_XATTRS))}): {', '.join(dropped[:3])}"
                + (" ..." if len(dropped) > 3 else ""))
        data_min = _align(content + content // 8 + count * 4096 + 64 * MiB)
        if options.size is not None:
            data_size = options.size - esp_size - 2 * ALIGN
            if data_size < data_min:
                raise BootimgError(f"--size {options.size // MiB} MiB is too small: the release needs "
                                   f"{(data_min + esp_size + 2 * ALIGN + MiB - 1) // MiB} MiB")
            data_size = data_size // ALIGN * ALIGN
        else:
            data_size = _align(data_min + options.headroom)
        data_img = work / "data.img"
        fs.ext4_from_tar(archive, data_img, data_size, label=DATA_LABEL, seed=f"{seed}/data", epoch=epoch,
                         inodes=max(count * 2, data_size // 16384, 16384))
        archive.unlink()

        # -- the partition table and the image --------------------------------------------------
        total = ALIGN + esp_size + data_size + ALIGN
        raw = work / "disk.raw"
        esp_start = ALIGN // SECTOR
        data_start = esp_start + esp_size // SECTOR
        script = (f"label: gpt\nlabel-id: {disk_guid}\nunit: sectors\nsector-size: {SECTOR}\nfirst-lba: 2048\n"
                  f"start={esp_start}, size={esp_size // SECTOR}, type={ESP_TYPE}, uuid={esp_uuid}, name=\"esp\"\n"
                  f"start={data_start}, size={data_size // SECTOR}, type={arch.root_type}, uuid={data_uuid}, "
                  f"name=\"{DATA_LABEL}\"\n")
        with open(raw, "wb") as f:
            f.truncate(total)
        proc_in = work / "sfdisk.script"
        proc_in.write_text(script)
        run(["sh", "-c", 'exec sfdisk --quiet --no-reread --no-tell-kernel "$1" < "$2"', "sfdisk", str(raw), str(proc_in)],
            what="sfdisk (partition table)")
        fd = os.open(raw, os.O_WRONLY)
        try:
            _copy_sparse(esp_img, fd, esp_start * SECTOR)
            _copy_sparse(data_img, fd, data_start * SECTOR)
            os.fsync(fd)
        finally:
            os.close(fd)
        if options.format == "qcow2":
            final = work / "disk.qcow2"
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(final)], what="qemu-img convert")
        else:
            final = raw
        os.replace(final, out)
    result = DiskResult(
        path=out, format=options.format, size=total, arch=arch.name, disk_guid=disk_guid, esp_partuuid=esp_uuid,
        data_partuuid=data_uuid, entry=loader.entry_id(release["name"], release["version"]), cmdline=cmdline,
        partitions={"esp": {"start": esp_start * SECTOR, "size": esp_size, "payload": payload},
                    "data": {"start": data_start * SECTOR, "size": data_size, "content": content, "entries": count}},
        boot={"kver": boot.kver, "kernel_size": boot.kernel.stat().st_size, "initrd_size": boot.initrd.stat().st_size,
              "uki": options.uki, "signed": options.secureboot_key is not None, "systemd_boot": sd_boot_from},
        seconds=time.monotonic() - t_start)
    return result


def describe(result: DiskResult) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True)


__all__ = ["DiskOptions", "DiskResult", "make_disk", "partitions", "data_partition_offset", "Partition", "FORMATS",
           "DATA_LABEL", "SECTOR"]
