"""A system of the tests' own, from manifest to a booted disk, the way a user goes:

    bootimg build m.yaml -o release          (root tree: the board's debootstrapped Debian root)
    bootimg initramfs release -o boot        (dracut in the release's own root; root needed)
    bootimg disk release -o disk --boot boot (an unprivileged user; twice: the same bytes)
    bootimg qemu disk --run ...              (UEFI firmware -> systemd-boot -> the verified root)
    bootimg kpi run --disk disk              (firmware and loader times from systemd-boot)

It is not manifests/board.yaml: its own name, the ``sealed`` trust profile (the digest on the
entry's command line is the only authority), one container from a directory, and KPI budgets
of its own. Real QEMU (TCG), marked vm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, board_rootfs_yaml, is_root, run_cli

pytestmark = [pytest.mark.vm, pytest.mark.skipif(not is_root(), reason="builds and boots a root: needs root")]

NAME = "fleet-gw"
CONTAINER = "telemetry"

MANIFEST = f"""\
apiVersion: bootimg/v1
identity: {{name: {NAME}, version: "0.9", source_date_epoch: 1767225600}}
{board_rootfs_yaml(NAME)}containers:
  - name: {CONTAINER}
    image: {{type: directory, path: build/images/telemetry}}
    command: [/usr/bin/telemetryd, --config, /etc/telemetry.toml]
    network: host
    restart: on-failure
integrity: {{trust: sealed, fsverity: required}}
boot:
  kernel_args: ["console=ttyS0,115200"]
  on_verification_failure: reboot
kpis:
  - {{name: root-mounted, measure: root_mounted, statistic: max, warn_ms: 200000, fail_ms: 400000}}
  - {{name: root-hook, measure: root_hook, statistic: max, warn_ms: 60000, fail_ms: 120000}}
  - {{name: {CONTAINER}-up, measure: unit_active, unit: {CONTAINER}, statistic: max, warn_ms: 300000, fail_ms: 600000}}
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    r = run_cli(*args)
    assert r.returncode == 0, (args, r.stderr.decode()[-3000:])
    return r


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Path:
    """The built release, its kernel + initramfs, and its disks (raw and qcow2)."""
    from conftest import example_workspace

    from bootimg.board import prepare
    from bootimg.board.system import ensure_tree

    top = example_workspace(tmp_path_factory.mktemp("gw"))
    ensure_tree(prepare(), top / "build")
    (top / "m.yaml").write_text(MANIFEST)
    cli("build", str(top / "m.yaml"), "-o", str(top / "release"))
    cli("initramfs", str(top / "release"), "-o", str(top / "boot"))
    # The disk step as an unprivileged user, twice: the same bytes.
    sys.path.insert(0, str(REPO / "tests"))
    from test_disk import as_user, open_to_all

    out = top / "disks"
    out.mkdir()
    open_to_all(top / "release", top / "boot", out)
    out.chmod(0o777)
    for name in ("a.raw", "b.raw", "disk.qcow2"):
        fmt = ["--format", "qcow2"] if name.endswith("qcow2") else []
        r = as_user(["disk", str(top / "release"), "-o", str(out / name), "--boot", str(top / "boot"), *fmt], out)
        assert r.returncode == 0, r.stderr.decode()
    assert (out / "a.raw").stat().st_uid != 0
    assert (out / "a.raw").read_bytes() == (out / "b.raw").read_bytes()
    return top


def release(gw: Path) -> dict:
    return json.loads((gw / "release" / "release.json").read_text())


PROBE = (f"cat /run/bootimg/booted.json; findmnt -no FSTYPE,OPTIONS /; "
         f"systemctl is-system-running --wait >/dev/null; systemctl is-active {CONTAINER}.service; "
         f"findmnt -no OPTIONS /run/bootimg/containers/{CONTAINER}")


def probe(disk: Path, *extra: str) -> list[str]:
    r = run_cli("qemu", str(disk), "--run", PROBE, "--timeout", "1500", *extra)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return r.stdout.decode().splitlines()


def check_booted(lines: list[str], rel: dict) -> None:
    booted = json.loads(lines[0])
    assert booted["digest"] == rel["root"]["digest"] and booted["trust"] == "sealed"
    assert booted["verity"] == "require"
    fstype, options = lines[1].split()
    assert fstype == "overlay" and "verity=require" in options.split(",")
    assert lines[2] == "active"
    assert "verity=require" in lines[3].split(",")


def test_raw_disk_boots_verified_by_uefi(gw):
    """The first boot of the fresh disk (writes kept: it provisions fs-verity), then a second one."""
    disk = gw / "disks" / "a.raw"
    check_booted(probe(disk, "--console-log", str(gw / "first.log")), release(gw))
    console = (gw / "first.log").read_text(errors="replace")
    assert "provisioning: enabling fs-verity" in console
    assert "Command line: initrd=\\bootimg\\fleet-gw\\0.9\\initrd.img root=PARTUUID=" in console   # systemd-boot's
    check_booted(probe(disk, "--snapshot"), release(gw))


def test_qcow2_disk_boots_too(gw):
    check_booted(probe(gw / "disks" / "disk.qcow2"), release(gw))


def test_kpi_run_on_the_disk_has_firmware_and_loader_times(gw, tmp_path):
    out = tmp_path / "kpi"
    r = run_cli("kpi", "run", "--manifest", str(gw / "m.yaml"), "--times", "1", "--disk",
                str(gw / "disks" / "a.raw"), "-o", str(out))
    assert r.returncode in (0, 1), r.stderr.decode()[-3000:]
    doc = json.loads((out / "kpi.json").read_text())
    boot = doc["boots"][0]
    for phase in ("firmware", "loader"):
        assert boot["phases"][phase]["state"] == "ok" and boot["phases"][phase]["usec"] > 0, boot["phases"][phase]
    assert "(firmware)" in boot["analyze_time"] and "(loader)" in boot["analyze_time"]
    assert boot["booted"]["digest"] == release(gw)["root"]["digest"]
    verdicts = {k["name"]: k for k in doc["kpis"]}
    assert verdicts[f"{CONTAINER}-up"]["verdict"] == "pass"
    # bootimg-setup-root's own time in the initrd, from this boot's journal
    assert verdicts["root-hook"]["verdict"] == "pass" and 0 < verdicts["root-hook"]["stats"]["max"] < 60000, \
        verdicts["root-hook"]
    html = (out / "kpi.html").read_text()
    assert "<th>firmware</th><th>loader</th>" in html and "<title>firmware:" in html and "<title>loader:" in html


def test_tampered_object_on_the_disk_reads_as_eio(gw, tmp_path):
    """One byte of one object of the root, changed on the data partition after the disk was
    made (and given fs-verity of its own at the next boot): the file reads as EIO."""
    from bootimg.board import diskedit

    def flip(data: bytes) -> bytes:
        changed = bytearray(data)
        changed[100] ^= 0x01
        return bytes(changed)

    victim = "/usr/share/common-licenses/GPL-3"
    disk = tmp_path / "tampered.raw"
    subprocess.run(["cp", "--sparse=always", str(gw / "disks" / "a.raw"), str(disk)], check=True)
    obj = diskedit.tamper_object(disk, gw / "release" / "images" / "root.cfs", victim, flip)
    r = run_cli("qemu", str(disk), "--run", f"cat {victim} >/dev/null; echo status=$?; dmesg | grep 'wrong fs-verity'",
                "--timeout", "1500")
    out = r.stdout.decode() + r.stderr.decode()
    assert "Input/output error" in out and "status=1" in out, out[-3000:]
    assert f"lower file '{obj.split('/')[1]}' has the wrong fs-verity digest" in out
