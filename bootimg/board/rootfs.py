"""The board's Debian root filesystem: debootstrap + a small customisation, cached as a tarball.

The tarball is keyed by a hash of every input (architecture, suite, mirror, package lists, the
kernel's suite and the customisation script's text), so changing any of them builds a new one and
an unchanged spec reuses the old one in well under a second. Builds go to a scratch directory next
to the cache and are renamed into place only when complete.

A root of another architecture than the host's (arm64 on an x86_64 build host) is debootstrapped
the same way: its maintainer scripts and the chroot steps run through qemu-user, which
``host.enable_foreign`` registers with binfmt_misc first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import arch as archmod
from ..host import (
    HostError,
    Log,
    cache_dir,
    cache_used,
    chroot_run,
    digest,
    enable_foreign,
    file_lock,
    need_root,
    need_tools,
    prune_cache,
    remove_tree,
    run,
    scratch_dir,
    stderr_log,
    write_json_atomically,
)

# Bump when the build procedure changes in a way the spec and the script do not show.
FORMAT = 1
CACHED_ROOTS = 6       # root tarballs kept beyond those of the last hours (host.prune_cache)

DEFAULT_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "dracut", "dracut-core", "kmod", "e2fsprogs",
    "util-linux", "mount", "fsverity", "minisign", "procps", "iproute2",
    # dracut compresses the board's lean initramfs (manifests/board.yaml) with the root's xz.
    "xz-utils",
    # sshd: the host reaches the running board over QEMU's user network (tests, KPI collection);
    # systemd-stdio-bridge (in systemd) serves pystemd's and systemctl -H's remote bus over it.
    "openssh-server",
)

# Installed with apt-get in the customize step (debootstrap's resolver does not follow their
# dependencies through virtual packages): a release's life on the device, systemd-boot's boot
# assessment (systemd-bless-boot, bootctl), `bootimg install/gc/status` (python3 +
# python3-cryptography; the board copies bootimg in), and tpm2-tools to look at the TPM's
# rollback counter from outside bootimg's own code.
APT_PACKAGES = ("systemd-boot", "python3", "python3-cryptography", "tpm2-tools")

MARKER = "BOOTIMG-BOARD: READY"
POWEROFF_ARG = "bootimg.board.poweroff=1"     # the readiness unit powers the board off after the marker

# Installed as /usr/local/sbin/board-ready. Runs once the default target is active (Type=oneshot,
# After=multi-user.target). `systemd-analyze time` cannot answer yet at that point (the boot is
# not "finished" while this very job runs), so the line is computed from the same manager
# timestamps systemd-analyze uses; "userspace" ends when the default target became active.
BOARD_READY_SH = r'''#!/bin/sh
# bootimg board: print one marker line on the serial console; power off if asked to.
prop() { systemctl show --value -p "$@" 2>/dev/null; }
secs() { printf '%d.%03ds' $(($1 / 1000000)) $(($1 % 1000000 / 1000)); }
initrd=$(prop InitRDTimestampMonotonic); initrd=${initrd:-0}
user=$(prop UserspaceTimestampMonotonic); user=${user:-0}
target=$(systemctl get-default 2>/dev/null || echo default.target)
reached=$(prop ActiveEnterTimestampMonotonic "$target"); reached=${reached:-0}
if [ "$reached" -eq 0 ]; then reached=$(prop ActiveEnterTimestampMonotonic multi-user.target); fi
if [ "$initrd" -gt 0 ]; then
    summary="$(secs "$initrd") (kernel) + $(secs $((user - initrd))) (initrd) + $(secs $((reached - user))) (userspace)"
else
    summary="$(secs "$user") (kernel) + $(secs $((reached - user))) (userspace)"
fi
line="BOOTIMG-BOARD: READY Startup finished in $summary = $(secs "$reached"); $target reached; uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "$line"
tty=/dev/ttyS0
[ -c "$tty" ] || tty=/dev/console
printf '%s\n' "$line" > "$tty"
case " $(cat /proc/cmdline) " in
    *" bootimg.board.poweroff=1 "*) systemctl --no-block poweroff ;;
esac
'''

BOARD_READY_UNIT = '''[Unit]
Description=bootimg board: report readiness on the serial console
After=multi-user.target serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/board-ready
StandardOutput=journal

[Install]
WantedBy=multi-user.target
'''

# Autologin as root on the serial console. No vhangup/reset of the tty: a hangup flushes the
# tty's output buffer, which can swallow the marker line written just before the getty starts.
GETTY_DROPIN = '''[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --nohangup --keep-baud 115200,57600,38400,9600 - $TERM
TTYVHangup=no
TTYReset=no
'''

# Runs inside the debootstrapped tree (chroot, /proc /sys /dev mounted) with MIRROR, SUITE,
# KERNEL_SUITE, KERNEL_PACKAGES, APT_PACKAGES and HOSTNAME in the environment.
CUSTOMIZE_SH = r'''
export DEBIAN_FRONTEND=noninteractive INITRD=No
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d

printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > /etc/apt/sources.list
printf 'deb %s %s main\n' "$MIRROR" "$KERNEL_SUITE" > /etc/apt/sources.list.d/$KERNEL_SUITE.list
apt-get -q update
# INITRD=No: dracut's kernel hook would build a host-only initramfs here; bootimg builds its own.
apt-get -q install -y --no-install-recommends -t "$KERNEL_SUITE" $KERNEL_PACKAGES
[ -z "$APT_PACKAGES" ] || apt-get -q install -y --no-install-recommends $APT_PACKAGES
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
rm -f /boot/initrd.img-* /initrd.img /initrd.img.old

echo "$HOSTNAME" > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$HOSTNAME" > /etc/hosts
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -f /etc/resolv.conf
# No "/" line: systemd-remount-fs would trip over it once "/" is a composefs overlay.
echo '# bootimg board: the root comes from root= on the kernel command line' > /etc/fstab
passwd -d root
# sshd: keys only (the board's authorized_keys is added where a disk is made), no DNS lookups.
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' > /etc/ssh/sshd_config.d/board.conf
systemctl enable ssh.service
# QEMU's user network, static (no DHCP wait): the host forwards a local port to 10.0.2.15:22.
mkdir -p /etc/systemd/network
printf '[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' > /etc/systemd/network/80-board.network
systemctl enable systemd-networkd.service

mkdir -p /etc/systemd/system/serial-getty@ttyS0.service.d
cat > /etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf <<'EOF'
@GETTY_DROPIN@EOF
systemctl enable serial-getty@ttyS0.service
# An empty machine-id makes every boot a first boot: no interactive first-boot questions.
systemctl mask systemd-firstboot.service
systemctl set-default multi-user.target

cat > /usr/local/sbin/board-ready <<'EOF'
@BOARD_READY_SH@EOF
chmod 0755 /usr/local/sbin/board-ready
cat > /etc/systemd/system/board-ready.service <<'EOF'
@BOARD_READY_UNIT@EOF
systemctl enable board-ready.service

rm -f /usr/sbin/policy-rc.d
rm -rf /tmp/* /var/tmp/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
'''


def customize_script(console: str = archmod.X86_64.console) -> str:
    """The customisation script for a machine whose serial console is ``console`` (ttyS0 on the
    PC, ttyAMA0 on arm64's virt): the autologin getty and the readiness line go there."""
    script = (CUSTOMIZE_SH.replace("@GETTY_DROPIN@", GETTY_DROPIN)
              .replace("@BOARD_READY_SH@", BOARD_READY_SH)
              .replace("@BOARD_READY_UNIT@", BOARD_READY_UNIT))
    return script.replace("ttyS0", console)


@dataclass(frozen=True)
class RootfsSpec:
    """Every input of the root filesystem; its ``key()`` names the cached tarball."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "minbase"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    kernel_suite: str = "bookworm-backports"
    kernel_packages: tuple[str, ...] = ("linux-image-amd64",)
    apt_packages: tuple[str, ...] = APT_PACKAGES
    hostname: str = "board"
    extra_packages: tuple[str, ...] = field(default=())
    arch: str = archmod.X86_64.name              # Debian's name: amd64, arm64

    @classmethod
    def for_arch(cls, name: str, **kw) -> RootfsSpec:
        """The board root for an architecture: its Debian kernel; besides amd64 also
        systemd-boot-efi in the root (a build host has only its own architecture's)."""
        arch = archmod.by_name(name)
        if arch is archmod.X86_64:
            return cls(**kw)
        kw.setdefault("kernel_packages", (arch.kernel_package,))
        kw.setdefault("extra_packages", ("systemd-boot-efi",))
        return cls(arch=arch.name, **kw)

    @property
    def target(self) -> archmod.Arch:
        return archmod.by_name(self.arch)

    def inputs(self) -> dict:
        data = asdict(self)
        if self.arch == archmod.X86_64.name:
            del data["arch"]        # the amd64 keys predate the field: existing caches stay valid
        data["format"] = FORMAT
        data["customize_sh"] = customize_script(self.target.console)
        return data

    def key(self) -> str:
        return digest(self.inputs())


@dataclass(frozen=True)
class Rootfs:
    """A finished, cached root filesystem tarball and what was learnt while building it."""

    tarball: Path
    key: str
    info: dict
    cached: bool
    seconds: float
    arch: str = archmod.X86_64.name

    @property
    def kver(self) -> str:
        return self.info["kver"]

    @property
    def target(self) -> archmod.Arch:
        return archmod.by_name(self.arch)

    @property
    def info_path(self) -> Path:
        return info_path(self.tarball)


def info_path(tarball: Path) -> Path:
    return tarball.with_name(tarball.name.split(".tar")[0] + ".json")


def build_rootfs(spec: RootfsSpec | None = None, *, cache: str | os.PathLike[str] | None = None,
                 rebuild: bool = False, log: Log = stderr_log) -> Rootfs:
    """Return the cached root filesystem tarball for ``spec``, building it first if needed."""
    spec = spec or RootfsSpec()
    start = time.monotonic()
    cdir = cache_dir(cache)
    key = spec.key()
    tarball = cdir / f"rootfs-{key}.tar.zst"
    info_file = info_path(tarball)
    with file_lock(cdir / f".rootfs-{key}.lock"):
        if not rebuild and tarball.is_file() and info_file.is_file():
            cache_used(tarball)
            try:
                info = json.loads(info_file.read_text())
            except (OSError, ValueError) as err:
                raise HostError(f"unreadable build record ({err}); delete it to rebuild",
                                 file=str(info_file)) from None
            return Rootfs(tarball, key, info, True, time.monotonic() - start, spec.arch)
        need_root("building the board root filesystem")
        need_tools("debootstrap", "tar", "zstd", "unshare", "chroot", "env")
        enable_foreign(spec.target)
        logs = cdir / "logs"
        logs.mkdir(exist_ok=True)
        log_file = logs / f"rootfs-{key}.log"
        log_file.write_text(json.dumps(spec.inputs(), indent=1) + "\n")
        log(f"building root filesystem {key} ({spec.suite} {spec.arch}, kernel from {spec.kernel_suite}); "
            f"log: {log_file}")
        with scratch_dir(cdir, f".build-rootfs-{key}-") as work:
            tree = work / "tree"
            t0 = time.monotonic()
            run(["debootstrap", f"--arch={spec.arch}", f"--variant={spec.variant}", "--components=main",
                 "--include=" + ",".join(spec.packages + spec.extra_packages),
                 spec.suite, str(tree), spec.mirror],
                what="debootstrap", log_file=log_file)
            t_debootstrap = time.monotonic() - t0
            log(f"debootstrap done in {t_debootstrap:.0f} s; customising")
            script = tree / "tmp" / "board-customize.sh"
            script.write_text(customize_script(spec.target.console))
            t0 = time.monotonic()
            chroot_run(tree, ["sh", "-eux", "/tmp/board-customize.sh"], what="customising the root",
                       log_file=log_file,
                       env={"MIRROR": spec.mirror, "SUITE": spec.suite,
                            "KERNEL_SUITE": spec.kernel_suite,
                            "KERNEL_PACKAGES": " ".join(spec.kernel_packages),
                            "APT_PACKAGES": " ".join(spec.apt_packages),
                            "HOSTNAME": spec.hostname})
            t_customize = time.monotonic() - t0
            script.unlink(missing_ok=True)
            kvers = sorted(p.name for p in (tree / "usr/lib/modules").iterdir()) \
                if (tree / "usr/lib/modules").is_dir() else []
            if len(kvers) != 1:
                raise HostError(f"expected one kernel in the root, found {kvers or 'none'}; log: {log_file}")
            packages = chroot_run(tree, ["dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
                                  what="listing packages", capture=True).split()
            log(f"kernel {kvers[0]}; packing {tarball.name}")
            t0 = time.monotonic()
            tmp_tar = work / tarball.name
            pack_tree(tree, tmp_tar, log_file=log_file)
            t_pack = time.monotonic() - t0
            info = {
                "key": key, "spec": asdict(spec), "format": FORMAT, "kver": kvers[0],
                "packages": packages, "tarball_bytes": tmp_tar.stat().st_size,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": {"debootstrap": round(t_debootstrap, 1), "customize": round(t_customize, 1),
                            "pack": round(t_pack, 1), "total": round(time.monotonic() - start, 1)},
            }
            # The record first, then the tarball: a tarball present means a complete build.
            write_json_atomically(info_file, info)
            os.replace(tmp_tar, tarball)
        prune_cache(cdir, "rootfs-", ".tar.zst", keep=CACHED_ROOTS, log=log)
        return Rootfs(tarball, key, info, False, time.monotonic() - start, spec.arch)


_TAR_XATTRS = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]


def pack_tree(tree: Path, tarball: Path, *, log_file: Path | None = None) -> None:
    """Tar + zstd a tree, preserving numeric owners, modes, xattrs, devices and hard links."""
    run(["tar", *_TAR_XATTRS, "--one-file-system", "--sort=name", "-I", "zstd -T0 -6 -q",
         "-C", str(tree), "-cf", str(tarball), "."],
        what=f"packing {tarball.name}", log_file=log_file)


def extract_rootfs(rootfs: Rootfs | str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a root filesystem tarball into ``dest`` (created; must be empty or missing)."""
    need_tools("tar", "zstd")
    tarball = rootfs.tarball if isinstance(rootfs, Rootfs) else Path(rootfs)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise HostError("extraction target is not empty", file=str(dest))
    try:
        run(["tar", *_TAR_XATTRS, "-I", "zstd -q", "-xpf", str(tarball), "-C", str(dest)],
            what=f"extracting {tarball.name}")
    except BaseException:
        remove_tree(dest)
        raise
    return dest


def rootfs_package_versions(rootfs: Rootfs) -> dict[str, str]:
    return dict(p.split("=", 1) for p in rootfs.info.get("packages", []))


__all__ = ["APT_PACKAGES", "DEFAULT_PACKAGES", "MARKER", "POWEROFF_ARG", "Rootfs", "RootfsSpec", "build_rootfs",
           "extract_rootfs", "pack_tree", "customize_script"]
