"""Boot KPI collection cost: seconds per collected boot over each transport and data path.

Boots the board's Debian root (systemd 252) in systemd-nspawn and collects the same boot
repeatedly: pystemd on the container's bus socket, busctl on it, and over ssh (pystemd through
systemd-stdio-bridge, busctl in one ssh session) to the container's sshd on a loopback port.
With --disk DISK (a disk `bootimg disk` made, e.g. build/board/release.disk.raw) it also boots it once
and collects over ssh there. Needs root. Prints one line per path: median and min of --repeat runs.

    .venv/bin/python bench/bench_kpi.py [--repeat 10] [--disk build/board/release.disk.raw]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootimg.kpi import nspawn  # noqa: E402
from bootimg.kpi.collect import collect  # noqa: E402
from bootimg.kpi.transport import open_transport  # noqa: E402

UNITS = ["ssh.service", "systemd-journald.service", "multi-user.target", "dbus.service"]


def measure(label: str, opener, repeat: int) -> None:
    opens, totals, objects = [], [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        t = opener()
        t1 = time.perf_counter()
        rec = collect(t, UNITS)
        t.close()
        opens.append(t1 - t0)
        totals.append(time.perf_counter() - t0)
        objects = 1 + len(rec.properties["units"])
    print(f"{label:34s} {statistics.median(totals) * 1000:8.1f} ms/boot (min {min(totals) * 1000:7.1f}, "
          f"connect {statistics.median(opens) * 1000:6.1f}; {objects} objects, one GetAll each)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--disk", metavar="DISK")
    args = ap.parse_args()
    from bootimg.board.rootfs import build_rootfs, extract_rootfs
    from bootimg.host import quiet_log

    with tempfile.TemporaryDirectory(prefix="bench-kpi-", dir="/var/tmp") as d:
        work = Path(d)
        t0 = time.perf_counter()
        root = extract_rootfs(build_rootfs(log=quiet_log), work / "root")
        port = 23456
        (root / "etc/ssh/sshd_config.d/bench.conf").write_text(f"Port {port}\nListenAddress 127.0.0.1\n")
        key = work / "id"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        (root / "root/.ssh/authorized_keys").write_text(key.with_suffix(".pub").read_text())
        cfg = work / "ssh_config"
        cfg.write_text(f"Host c\n HostName 127.0.0.1\n Port {port}\n User root\n IdentityFile {key}\n"
                       " StrictHostKeyChecking no\n UserKnownHostsFile /dev/null\n LogLevel ERROR\n")
        print(f"root tree extracted in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        with nspawn.booted(root) as c:
            print(f"container booted (finished) in {time.perf_counter() - t0:.2f} s; "
                  f"{c.run('systemd-analyze', 'time').stdout.splitlines()[0]}", flush=True)
            for via in ("pystemd", "busctl"):
                measure(f"container bus socket, {via}", lambda: open_transport(container=str(c.pid), via=via),
                        args.repeat)
            for via in ("pystemd", "busctl"):
                measure(f"ssh (loopback container), {via}",
                        lambda: open_transport(ssh="c", ssh_config=str(cfg), via=via), args.repeat)
    if args.disk:
        from bootimg.kpi.run import wait_finished
        from bootimg.vm.qemu import Machine
        from bootimg.vm.session import running

        with running(Machine(disk=Path(args.disk)), timeout=900) as vm:
            print(f"qemu: {vm.result.summary()}", flush=True)
            with open_transport(ssh=vm.host_alias, ssh_config=str(vm.ssh_config)) as t:
                wait_finished(t, 600)
            for via in ("pystemd", "busctl"):
                measure(f"QEMU (TCG, UEFI disk) over ssh, {via}",
                        lambda: open_transport(ssh=vm.host_alias, ssh_config=str(vm.ssh_config), via=via),
                        max(3, args.repeat // 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
