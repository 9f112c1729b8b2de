"""Building bootimg-setup-root (bootimg.boot.setup_root): the release build has no test hooks,
builds are reproducible and cached, the root's architecture is read from its own binaries, a
missing cross compiler or a too old glibc in the root is one clear error, and the program stays
within the initramfs size budget."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import have

from bootimg.boot import setup_root
from bootimg.composefs.tree import Node
from bootimg.errors import BootimgError

# Names only a test build may contain: the environment is read for them.
TEST_ONLY = [b"BOOTIMG_TEST_VERITY", b"BOOTIMG_SYSROOT", b"BOOTIMG_CONF", b"BOOTIMG_KEYS_DIR", b"BOOTIMG_CMDLINE",
             b"BOOTIMG_KMSG", b"BOOTIMG_RUN", b"BOOTIMG_TEST_EROFS", b"BOOTIMG_TEST_OVERLAY", b"BOOTIMG_TEST_TPM",
             b"BOOTIMG_TEST_ROOT", b"BOOTIMG_VOLATILE_ROOT", b"unix:"]


def dynamic_symbols(path: Path) -> set[str]:
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[7].split("@")[0] for line in out.splitlines() if len(line.split()) >= 8 and "UND" in line}


def test_release_build_has_no_test_hooks():
    release = setup_root.build()
    test = setup_root.build(variant="test")
    data, tdata = release.read_bytes(), test.read_bytes()
    for name in TEST_ONLY:
        assert name not in data, name
    assert all(name in tdata for name in TEST_ONLY)                # the check can fail
    # the release build reads no environment at all
    assert "getenv" not in dynamic_symbols(release) and "secure_getenv" not in dynamic_symbols(release)
    assert "getenv" in dynamic_symbols(test)
    # the TPM is a device in the release build; only a test build talks to swtpm's socket
    assert "connect" not in dynamic_symbols(release) and "connect" in dynamic_symbols(test)


def test_release_build_is_hardened_and_stripped():
    release = setup_root.build()
    head = subprocess.run(["readelf", "-h", "-l", "-d", "-W", str(release)], capture_output=True, text=True,
                          check=True).stdout
    assert "DYN (Position-Independent Executable file)" in head
    assert "GNU_RELRO" in head and "BIND_NOW" in head
    assert "RWE" not in head                                         # no executable stack
    syms = subprocess.run(["readelf", "-s", "-W", str(release)], capture_output=True, text=True, check=True).stdout
    assert ".symtab" not in syms
    assert "__stack_chk_fail" in dynamic_symbols(release)
    libs = [ln for ln in head.splitlines() if "(NEEDED)" in ln]
    assert len(libs) == 1 and "libc.so.6" in libs[0], libs           # libc only


def test_build_is_reproducible(tmp_path):
    a = setup_root.build(cache=tmp_path / "a")
    b = setup_root.build(cache=tmp_path / "b")
    assert a != b and a.read_bytes() == b.read_bytes()
    assert setup_root.build(cache=tmp_path / "a") == a                # cached by its key
    assert b"/work/" not in a.read_bytes() and str(setup_root.source_dir()).encode() not in a.read_bytes()


def test_size_budget():
    """The initramfs budget for everything bootimg adds is 64 KiB compressed; the program is
    most of it (bench/bench_board.py measures the whole initramfs)."""
    data = setup_root.build().read_bytes()
    assert len(gzip.compress(data, 9)) < 48 * 1024, len(gzip.compress(data, 9))


# -- the root's architecture and glibc -------------------------------------------------------------------

def tree(files: dict[str, bytes], links: dict[str, str] | None = None) -> setup_root.RootFiles:
    root = Node(stat.S_IFDIR | 0o755)

    def parent_of(path: str) -> Node:
        node = root
        for part in path.strip("/").split("/")[:-1]:
            node = node.children.setdefault(part.encode(), Node(stat.S_IFDIR | 0o755))
            node.parent = node.parent or root
        return node

    for path, data in files.items():
        n = Node(stat.S_IFREG | 0o755, size=len(data))
        n.content = data
        parent_of(path).add_child(path.rsplit("/", 1)[1].encode(), n)
    for path, target in (links or {}).items():
        n = Node(stat.S_IFLNK | 0o777, size=len(target))
        n.payload = target.encode()
        parent_of(path).add_child(path.rsplit("/", 1)[1].encode(), n)
    return setup_root.RootFiles(root, lambda node: node.target().content)


def elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44)


def test_root_arch_from_its_binaries():
    assert setup_root.root_arch(tree({"/usr/lib/systemd/systemd": elf(183)})).name == "aarch64"
    # /usr/bin/sh -> dash, a relative symlink, followed inside the tree
    assert setup_root.root_arch(tree({"/usr/bin/dash": elf(62)}, {"/usr/bin/sh": "dash"})).name == "x86_64"
    assert setup_root.root_arch(tree({"/usr/bin/dash": elf(62)}, {"/bin": "usr/bin", "/usr/bin/sh": "/bin/dash"})).name \
        == "x86_64"
    assert setup_root.root_arch(tree({"/etc/hostname": b"x"})) is None
    with pytest.raises(BootimgError, match="is for ELF machine 40"):
        setup_root.root_arch(tree({"/usr/bin/sh": elf(40)}))
    with pytest.raises(BootimgError, match="is not an ELF binary"):
        setup_root.root_arch(tree({"/usr/bin/sh": b"#!/bin/dash\n"}))


def test_a_missing_cross_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                        # no compiler on it
    with pytest.raises(BootimgError) as e:
        setup_root.build("aarch64", cache=tmp_path / "cache")
    assert "install the Debian package gcc-aarch64-linux-gnu" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(BootimgError, match=r"no C compiler for x86_64 .* install the Debian package gcc \("):
        setup_root.build("x86_64", cache=tmp_path / "cache")


@pytest.mark.skipif(not have("aarch64-linux-gnu-gcc"), reason="needs gcc-aarch64-linux-gnu (tools/setup-host.sh)")
def test_cross_build_for_an_aarch64_root(tmp_path):
    files = tree({"/usr/lib/systemd/systemd": elf(183)})
    binary, arch = setup_root.for_root(files, "test")
    assert arch.name == "aarch64"
    assert setup_root.elf_machine(binary[:64], "built").name == "aarch64"
    assert binary == setup_root.build("aarch64").read_bytes()


def test_glibc_of_the_root_is_checked(tmp_path):
    binary = setup_root.build().read_bytes()
    needed = setup_root.glibc_needed(binary)
    assert 17 <= needed <= 36, needed                                  # what the host toolchain links against
    host_libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if host_libc.exists():
        setup_root.check_glibc(binary, host_libc.read_bytes(), setup_root.ARCHES[62], "root")
    old = b"\0".join(f"GLIBC_2.{n}".encode() for n in range(2, 17)) + b"\0"
    with pytest.raises(BootimgError, match=rf"the root's glibc is 2.16 but bootimg-setup-root built here for x86_64 "
                                           rf"needs GLIBC_2.{needed}"):
        setup_root.check_glibc(binary, old, setup_root.ARCHES[62], "root")
    files = tree({"/usr/lib/systemd/systemd": elf(62), "/usr/lib/x86_64-linux-gnu/libc.so.6": old})
    if shutil.which("gcc"):
        with pytest.raises(BootimgError, match="the root's glibc is 2.16"):
            setup_root.for_root(files, "root")
