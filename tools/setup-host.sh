#!/bin/sh
# Idempotent host set-up for bootimg's tests and demo: Debian packages, then a venv at .venv
# with bootimg installed editable. Safe to run again; does nothing that is already done.
set -eu
cd "$(dirname "$0")/.."

# gcc, libc6-dev (only a Recommends of gcc) and libssl-dev build the optional C accelerator
# bootimg/composefs/_fsverity_accel.c against OpenSSL libcrypto.
APT_PACKAGES="erofs-utils fsverity attr util-linux e2fsprogs minisign signify-openbsd openssl gcc libc6-dev libssl-dev"
# make and the aarch64 cross compiler build bootimg-setup-root (bootimg/boot/setup_root/) for roots of
# either architecture (x86_64 with gcc itself).
APT_PACKAGES="$APT_PACKAGES make gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
# swtpm (a TPM 2.0 simulator, libtpms) and tpm2-tools test bootimg-setup-root's rollback counter
# against a real TPM (tests/test_setup_root_tpm.py).
APT_PACKAGES="$APT_PACKAGES swtpm swtpm-tools tpm2-tools"
# (shellcheck) lints the generated dracut module-setup.sh; busybox runs shell scripts under a second POSIX shell (tests).
APT_PACKAGES="$APT_PACKAGES shellcheck busybox systemd-container"
# debootstrap, e2fsprogs (mkfs.ext4 -d) and zstd build the QEMU board's Debian root (bootimg.board).
APT_PACKAGES="$APT_PACKAGES debootstrap zstd"
# pystemd (KPI collection) builds from source against libsystemd; chromium renders the HTML KPI report.
APT_PACKAGES="$APT_PACKAGES libsystemd-dev pkg-config chromium openssh-client"
# bootimg disk: sfdisk (fdisk), mkfs.vfat + mtools for the ESP, systemd-boot and the EFI stub,
# objcopy for UKIs, sbsign for Secure Boot; bootimg qemu: OVMF (UEFI firmware).
APT_PACKAGES="$APT_PACKAGES fdisk dosfstools mtools systemd-boot-efi binutils sbsigntool ovmf"
# osbuild (run from ../shared/osbuild; no registry has it): bubblewrap, python3-jsonschema, curl
# (its org.osbuild.curl source). bootimg's stages run with the build root's python3, here the
# host's: Debian's own python3-yaml, -jsonschema, -cryptography, -zstandard and -xxhash are
# bootimg's dependencies there (tools/install-buildroot.sh adds bootimg itself).
APT_PACKAGES="$APT_PACKAGES bubblewrap curl python3-jsonschema python3-yaml python3-cryptography python3-zstandard python3-xxhash python3-pip"
# arm64 systems (the car's architecture): AAVMF (UEFI for qemu-system-aarch64's virt machine), the
# cross compiler for the example containers' program (static, so libc6-dev-arm64-cross).
APT_PACKAGES="$APT_PACKAGES qemu-efi-aarch64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
PY=${PYTHON:-python3}
# Python.h: a pyenv or self-built interpreter has its own; Debian's python3 needs python3-dev.
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
case "$inc" in
    /usr/include/*) [ -f "$inc/Python.h" ] || APT_PACKAGES="$APT_PACKAGES python3-dev" ;;
esac

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Newer versions than bookworm's, from bookworm-backports (the source is added once, only if
# there is no backports source yet): QEMU >= 8 (bookworm's 7.2 crashes the board's 6.12 guest
# under TCG) and e2fsprogs >= 1.47.1 (`bootimg disk` makes the data partition with
# `mke2fs -d ARCHIVE.tar`; 1.47.0 copies the build host's inode change times, so its images are
# not reproducible). Elsewhere the distribution's own packages.
codename=$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")
backports() {  # PACKAGE...: install from bookworm-backports on bookworm, else from the distribution
    export DEBIAN_FRONTEND=noninteractive
    if [ "$codename" = bookworm ]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "setup: adding the bookworm-backports apt source"
            cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        fi
        echo "setup: installing $* from bookworm-backports"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends -t bookworm-backports "$@" >/dev/null
    else
        echo "setup: installing $*"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}
qemu_major() { "$1" --version 2>/dev/null | sed -n '1s/.* version \([0-9][0-9]*\)\..*/\1/p'; }
# qemu-system-arm: qemu-system-aarch64 (the arm64 board); qemu-user-static: an arm64 root's
# programs on this host (debootstrap's second stage, dracut in the root) through binfmt_misc,
# registered by bootimg from the package's /usr/lib/binfmt.d rule (F flag: works in chroots).
need_qemu=""
for q in qemu-system-x86_64:qemu-system-x86 qemu-system-aarch64:qemu-system-arm qemu-aarch64-static:qemu-user-static; do
    major=$(qemu_major "${q%%:*}")
    if [ "$major" = "" ] || [ "$major" -lt 8 ]; then need_qemu="$need_qemu ${q#*:}"; fi
done
command -v qemu-img >/dev/null || need_qemu="$need_qemu qemu-utils"
if [ -n "$need_qemu" ]; then
    backports $need_qemu qemu-utils
fi
e2fs_version() { mke2fs -V 2>&1 | sed -n 's/^mke2fs \([0-9.]*\).*/\1/p'; }
if ! printf '%s\n' 1.47.1 "$(e2fs_version)" | sort -V -C; then
    backports e2fsprogs
fi

# A venv without pip is one whose creation was interrupted (ensurepip runs last): made again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: creating .venv"
    "$PY" -m venv --clear .venv
fi
# Reinstall only when the project's metadata or C sources changed (an editable install does not
# rebuild the extension by itself), or when the built extension went missing.
stamp=.venv/.bootimg-installed
want=$(cat pyproject.toml bootimg/composefs/*.c | sha256sum | cut -d' ' -f1)
for ext in _fsverity_accel _scandir _imagepack; do
    if ! ls bootimg/composefs/$ext.*.so >/dev/null 2>&1; then
        rm -f "$stamp"
    fi
done
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: pip install -e .[test]"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi

# osbuild bind-mounts /etc/containers into its sandbox, so it must exist; then bootimg in the
# system Python for osbuild's host build root (idempotent, reinstalled when the sources change).
[ -d /etc/containers ] || mkdir -p /etc/containers
sh tools/install-buildroot.sh
