"""`bootimg kpi run` on the QEMU board (TCG): the board's plain ext4 baseline with its dracut
systemd initrd, reached over ssh (pystemd through systemd-stdio-bridge). Slow: marked vm."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import have, requires_root, run_cli

DATA = Path(__file__).parent / "data" / "kpi"

pytestmark = [pytest.mark.vm, requires_root,
              pytest.mark.skipif(not have("qemu-system-x86_64"), reason="needs QEMU")]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> list[str]:
    """`kpi run` target options: the board's plain ext4 root (with the vm ssh key), a direct boot."""
    from bootimg.board import baseline_cmdline, extract_rootfs, make_disk, prepare
    from bootimg.host import quiet_log
    from bootimg.vm.session import authorized_keys

    work = tmp_path_factory.mktemp("kpi-board")
    board = prepare(log=quiet_log)
    tree = extract_rootfs(board.rootfs, work / "tree")
    (tree / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (tree / "root/.ssh/authorized_keys").write_text(authorized_keys())
    disk = make_disk(work / "disk.img", tree, seed="kpi-board-test")
    return ["--disk", str(disk.path), "--kernel", str(board.kernel), "--initrd", str(board.initrd),
            "--append", baseline_cmdline(poweroff=False)]


def test_kpi_run_three_boots(baseline, tmp_path):
    out = tmp_path / "run"
    r = run_cli("kpi", "run", "--manifest", str(DATA / "board.yaml"), "--times", "3", *baseline, "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads((out / "kpi.json").read_text())
    assert [b["label"] for b in doc["boots"]] == ["first", "cold", "cold"]
    for b in doc["boots"]:
        assert b["clock"] == "target" and b["system"]["systemd_initrd"] is True
        assert b["phases"]["initrd"]["state"] == "ok" and b["phases"]["firmware"]["state"] == "not_measurable"
        assert b["milestones"]["root_mounted"]["state"] == "ok"
        # sysroot.mount is garbage-collected after switch-root: the initrd target ordered after it
        assert b["milestones"]["root_mounted"]["source"] == "dbus:initrd-root-fs.target.ActiveEnterTimestampMonotonic"
        assert b["milestones"]["initrd_start"]["usec"] < b["milestones"]["root_mounted"]["usec"] \
            < b["milestones"]["switch_root"]["usec"] < b["milestones"]["boot_finished"]["usec"]
        assert b["analyze_time"].startswith("Startup finished in ") and "(initrd)" in b["analyze_time"]
    assert {k["name"]: k["verdict"] for k in doc["kpis"]} == dict.fromkeys(
        ["initrd-start", "root-mounted", "sshd-up", "userspace-boot", "boot-finished"], "pass")
    assert ET.parse(out / "kpi.junit.xml").getroot().get("tests") == "5"
    assert "<svg" in (out / "kpi.html").read_text()

    # the same boots against budgets set too tight: exit 1, a clear JUnit failure
    tight = tmp_path / "tight.yaml"
    tight.write_text((DATA / "board.yaml").read_text().replace("warn_ms: 150000\n    fail_ms: 300000",
                                                               "warn_ms: 1\n    fail_ms: 2", 1))
    r = run_cli("kpi", "report", str(out / "kpi.json"), "--manifest", str(tight), "--junit", str(tmp_path / "t.xml"))
    assert r.returncode == 1
    fail = ET.parse(tmp_path / "t.xml").getroot().find("testcase[@name='root-mounted']/failure")
    assert fail is not None and fail.get("message").startswith("p95(root-mounted)=")
    assert "> fail budget 0.002s (n=3, source=dbus:initrd-root-fs.target.ActiveEnterTimestampMonotonic)" in fail.get("message")


def test_unreachable_board_exits_2(tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host board\n  HostName 127.0.0.1\n  Port 9\n  User root\n  ConnectTimeout 3\n")
    for via in ("pystemd", "busctl"):
        r = run_cli("kpi", "collect", "--ssh", "board", "--ssh-config", str(cfg), "--via", via)
        assert r.returncode == 2, (via, r.stderr)
        assert b"cannot connect" in r.stderr and b"Traceback" not in r.stderr
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    r = run_cli("kpi", "run", "--manifest", str(DATA / "board.yaml"), "--times", "1", "--disk", str(disk),
                "--kernel", str(tmp_path / "nokernel"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr
