"""Real systemd: the board's Debian root (systemd 252) booted with systemd-nspawn (~1 s a boot).

Collect through pystemd (the container's bus socket), through busctl (no pystemd), over ssh
(pystemd's sd_bus_open_system_remote + systemd-stdio-bridge, and busctl in one ssh session), and
from the journal; check the numbers against `systemd-analyze time` run in the same boot.
Then `bootimg kpi run` on N container boots, and the HTML report rendered by headless Chromium.
Needs root (nspawn, nsenter) and the board's cached root tarball (built once if missing).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from conftest import have, requires_root, run_cli

from bootimg.kpi import nspawn
from bootimg.kpi.collect import collect
from bootimg.kpi.history import history, local_runner
from bootimg.kpi.transport import open_transport

DATA = Path(__file__).parent / "data" / "kpi"
UNITS = ["ssh.service", "systemd-journald.service", "kpi-broken.service", "missing.service"]

pytestmark = [requires_root, pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from bootimg.board.rootfs import build_rootfs, extract_rootfs
    from bootimg.host import quiet_log

    tree = extract_rootfs(build_rootfs(log=quiet_log), tmp_path_factory.mktemp("kpi-nspawn") / "root")
    unit = tree / "etc/systemd/system/kpi-broken.service"
    unit.write_text("[Unit]\nDescription=a unit that fails\n[Service]\nType=oneshot\nExecStart=/bin/false\n")
    (tree / "etc/systemd/system/multi-user.target.wants/kpi-broken.service").symlink_to(
        "/etc/systemd/system/kpi-broken.service")
    # sshd on a loopback port of its own: the container shares the host's network.
    port = 22000 + (abs(hash(str(tree))) % 2000)
    (tree / "etc/ssh/sshd_config.d/kpi-test.conf").write_text(f"Port {port}\nListenAddress 127.0.0.1\n")
    key = tree.parent / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tree / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (tree / "root/.ssh/authorized_keys").write_text(key.with_suffix(".pub").read_text())
    (tree.parent / "ssh_config").write_text(
        f"Host kpi-container\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {key}\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    return tree


@pytest.fixture(scope="class")
def booted(root):
    """One container boot, powered off after the class that uses it."""
    with nspawn.booted(root) as c:
        yield c


def analyze(c) -> str:
    r = c.run("systemd-analyze", "time")
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip()


class TestOneBoot:
    """Several readers of ONE container boot."""

    @pytest.mark.parametrize("via", ["pystemd", "busctl"])
    def test_container_numbers_reconcile_with_systemd_analyze(self, booted, via):
        with open_transport(container=str(booted.pid), via=via) as t:
            rec = collect(t, UNITS)
        assert rec.analyze_time.rstrip() == analyze(booted)
        assert rec.system["systemd_version"].startswith("252") and rec.system["virtualization"] == "systemd-nspawn"
        # the Manager's own numbers, read by `systemctl show` in the container
        show = booted.run("systemctl", "show", "-p", "UserspaceTimestampMonotonic", "-p", "FinishTimestampMonotonic").stdout
        vals = dict(line.split("=", 1) for line in show.split())
        assert rec.phases["userspace"].usec == int(vals["FinishTimestampMonotonic"]) - int(vals["UserspaceTimestampMonotonic"])
        assert rec.milestones["boot_finished"].usec == int(vals["FinishTimestampMonotonic"])
        ssh_active = booted.run("systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value", "ssh.service").stdout
        assert rec.units["ssh.service"].active_usec == int(ssh_active)
        assert rec.units["kpi-broken.service"].active_state == "failed"
        assert rec.units["missing.service"].load_state == "not-found"
        assert rec.boot_id == booted.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip().replace("-", "")

    def test_pystemd_and_busctl_read_the_same(self, booted):
        recs = []
        for via in ("pystemd", "busctl"):
            with open_transport(container=str(booted.pid), via=via) as t:
                recs.append(collect(t, UNITS))
        a, b = (r.to_dict() for r in recs)
        for key in ("phases", "milestones", "units", "analyze_time", "boot_id", "system"):
            assert a[key] == b[key], key

    def test_over_ssh_like_systemd_analyze_H(self, booted, root):
        cfg = str(root.parent / "ssh_config")
        with open_transport(container=str(booted.pid)) as t:
            local = collect(t, UNITS)
        for via in ("pystemd", "busctl"):
            with open_transport(ssh="kpi-container", ssh_config=cfg, via=via) as t:
                rec = collect(t, UNITS)
            assert rec.source == f"{via}:ssh kpi-container"
            assert rec.boot_id == local.boot_id
            assert rec.analyze_time == local.analyze_time
            assert rec.units["ssh.service"].active_usec == local.units["ssh.service"].active_usec

    def test_cli_collect_container_and_record(self, booted, tmp_path):
        rec = tmp_path / "props.json"
        r = run_cli("kpi", "collect", "--container", str(booted.pid), "--unit", "ssh.service", "--record", str(rec),
                    "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["schema"] == "bootimg.kpi.boots/1" and len(doc["boots"]) == 1
        assert json.loads(rec.read_text())["objects"]["/org/freedesktop/systemd1"]["Version"].startswith("252")



def test_history_from_the_journal_matches_the_bus(root):
    with nspawn.booted(root) as c:
        with open_transport(container=str(c.pid)) as t:
            live = collect(t, UNITS)
            online = history(lambda argv: t.run(argv), units=UNITS, source="journal via container")
        c.run("journalctl", "--flush")
    offline = history(local_runner, directory=str(root / "var/log/journal"), units=UNITS)
    for recs in (online, offline):
        this = next(r for r in recs if r.boot_id == live.boot_id)
        # USERSPACE_USEC of "Startup finished" is exactly the bus's Finish - Userspace
        assert this.phases["userspace"].usec == live.phases["userspace"].usec
        assert this.phases["userspace"].source.startswith("journal:")
        # job-done messages are logged just after the state change
        d = this.milestones["default_target"].usec - live.milestones["default_target"].usec
        assert 0 <= d < 50_000, d
        assert this.milestones["default_target"].source.startswith("journal:job-done")
    assert len(offline) >= 2  # the module's other boot(s) of the same tree are history too


def test_kpi_run_containers_reports_and_chromium(root, tmp_path):
    out = tmp_path / "run"
    r = run_cli("kpi", "run", "--manifest", str(DATA / "container.yaml"), "--times", "3",
                "--container-root", str(root), "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads((out / "kpi.json").read_text())
    assert [b["label"] for b in doc["boots"]] == ["first", "cold", "cold"]
    assert len({b["boot_id"] for b in doc["boots"]}) == 3
    assert all(k["verdict"] == "pass" and k["stats"]["n"] == 3 for k in doc["kpis"])
    assert all(b["collect_seconds"] < 5 for b in doc["boots"])
    # a budget set too tight: exit 1 and a JUnit failure naming value, statistic, budget, source
    tight = tmp_path / "tight.yaml"
    tight.write_text((DATA / "container.yaml").read_text().replace("warn_ms: 20000\n    fail_ms: 30000\n    max_ms: 40000",
                                                                   "warn_ms: 1\n    fail_ms: 2"))
    r = run_cli("kpi", "report", str(out / "kpi.json"), "--manifest", str(tight), "--junit", str(tmp_path / "j.xml"))
    assert r.returncode == 1
    junit = (tmp_path / "j.xml").read_text()
    assert 'failures="1"' in junit and "p95(sshd-up)=" in junit and "&gt; fail budget 0.002s" in junit
    assert "source=dbus:ssh.service.ActiveEnterTimestampMonotonic" in junit
    render_and_check(out / "kpi.html", tmp_path / "kpi.png")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_and_check(page: Path, png: Path) -> None:
    if chromium() is None:
        pytest.skip("chromium not installed (tools/setup-host.sh installs it)")
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1400,1400", page.resolve().as_uri()],
                   capture_output=True, timeout=120)
    w, h, colours, dark = png_stats(png.read_bytes())
    assert (w, h) == (1400, 1400)
    assert colours > 50  # text, badges, bars: a real page, not a blank or an error page
    assert 0.005 < dark < 0.5  # some ink, not all ink


def png_stats(data: bytes) -> tuple[int, int, int, float]:
    """(width, height, distinct colours, fraction of dark pixels) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype = ihdr[0], ihdr[1], ihdr[2], ihdr[3]
    assert depth == 8 and ctype in (2, 6)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    colours, dark = set(), 0
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        if y % 4 == 0:  # sample every 4th row: enough for the checks, 4x faster
            for x in range(0, stride, bpp):
                px = bytes(line[x:x + 3])
                colours.add(px)
                if sum(px) < 300:
                    dark += 1
    return w, h, len(colours), dark / ((h + 3) // 4 * w)

