"""A running machine the host can talk to: QEMU with a forwarded ssh port, kept up once ready.

``boot()`` answers "did it boot, and how long did it take"; tests and the KPI collector also need
to ask the booted system things (``/run/bootimg/booted.json``, mounts, unit states, the manager's
timestamps). ``running()`` boots like ``boot()`` and, once the machine is ready (its console
marker when one is given, else the first ssh connection), gives an ssh endpoint to it:

    with running(Machine(disk=Path("disk.raw"))) as vm:
        if vm.result.ok:
            print(vm.run("cat", "/run/bootimg/booted.json").stdout)

The guest's sshd listens on port 22 of QEMU's user network; the host forwards a free local port
to it. The client key lives in the cache (``$BOOTIMG_CACHE/vm/ssh``); systems get its public half
as root's ``authorized_keys`` (``authorized_keys()``, e.g. an ``add_files`` entry of the manifest).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from ..host import HostError, cache_dir, file_lock, need_tools
from .qemu import DEFAULT_TIMEOUT, BootResult, Machine, Run

HOST_ALIAS = "bootimg-vm"


def client_key(cache: str | os.PathLike[str] | None = None) -> Path:
    """The ssh client key for machines bootimg runs (ed25519, made once per cache; the private
    half never leaves the host). Returns the private key's path; the public half is next to it."""
    need_tools("ssh-keygen")
    cdir = cache_dir(cache, "vm") / "ssh"
    cdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = cdir / "id_ed25519"
    with file_lock(cdir / ".lock"):
        if not (key.is_file() and key.with_suffix(".pub").is_file()):
            for p in (key, key.with_suffix(".pub")):
                p.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bootimg-vm",
                            "-f", str(key)], check=True, capture_output=True)
    return key


def authorized_keys(cache: str | os.PathLike[str] | None = None) -> str:
    """The line to install as the guest root's ``~/.ssh/authorized_keys``."""
    return client_key(cache).with_suffix(".pub").read_text()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """A booted machine: ``result`` (the boot until it was ready) and an ssh endpoint."""

    def __init__(self, run: Run, result: BootResult | None, port: int, key: Path, config: Path):
        self._run = run
        self.result = result
        self.ssh_port = port
        self.ssh_key = key
        self.ssh_config = config

    host_alias = HOST_ALIAS

    @property
    def qemu_running(self) -> bool:
        return self._run.running

    def ssh_argv(self, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), HOST_ALIAS, *command]

    def run(self, *command: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command on the machine (through the guest's shell, like ssh does)."""
        try:
            proc = subprocess.run(self.ssh_argv(*command), capture_output=True, text=True,
                                  timeout=timeout, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HostError(f"vm: {' '.join(command)!r} over ssh took more than {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise HostError(f"vm: {' '.join(command)!r} failed with exit status {proc.returncode}: "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        return proc

    def unit_properties(self, units: list[str], props: str) -> dict[str, dict[str, str]]:
        """``systemctl show -p PROPS UNITS...`` on the machine, one ssh call: {unit id: {prop: value}}
        (``props`` comma-separated; ``Id`` is always read)."""
        out = self.run("systemctl", "show", "-p", f"Id,{props}", *units).stdout
        blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                  for block in out.strip().split("\n\n")]
        return {b["Id"]: b for b in blocks}

    def manager_property(self, name: str) -> str:
        """One property of the machine's service manager (e.g. UserspaceTimestampMonotonic)."""
        return self.run("systemctl", "show", "-p", name, "--value").stdout.strip()

    def probe_ssh(self) -> bool:
        """One ssh connection attempt (a short timeout): is sshd answering yet?"""
        try:
            proc = subprocess.run(self.ssh_argv("true"), capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def wait_ssh(self, timeout: float = 60.0) -> None:
        """Wait until sshd answers (it may start after the marker)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.qemu_running:
                raise HostError("vm: QEMU exited while waiting for ssh")
            proc = subprocess.run(self.ssh_argv("true"), capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=30)
            if proc.returncode == 0:
                return
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            time.sleep(1.0)
        raise HostError(f"vm: no ssh connection within {timeout:.0f} s: {last}")

    def power_cut(self) -> None:
        """Kill QEMU at once, as a power loss would: no shutdown, the guest's unwritten data is lost
        (what QEMU already wrote to the disk image stays)."""
        self._run.stop()

    def console_since(self, start: int = 0) -> list[tuple[float, str]]:
        """Console lines (host seconds, text) from index ``start`` on, while it runs."""
        with self._run.reader.cond:
            return list(self._run.reader.lines[start:])


def write_ssh_config(path: Path, port: int, key: Path) -> Path:
    path.write_text(
        f"Host {HOST_ALIAS}\n"
        f"    HostName 127.0.0.1\n    Port {port}\n    User root\n    IdentityFile {key}\n"
        f"    IdentitiesOnly yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
        f"    LogLevel ERROR\n    ConnectTimeout 10\n    ServerAliveInterval 5\n    BatchMode yes\n")
    return path


@contextlib.contextmanager
def running(machine: Machine, *, timeout: float = DEFAULT_TIMEOUT, marker: re.Pattern[str] | None = None,
            serial_log: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None,
            wait_ssh: bool = True) -> Iterator[Session]:
    """Boot ``machine`` and keep it up until the ``with`` block ends, then power it off.

    Ready means: the console ``marker`` when one is given (then ssh is waited for), else the
    first successful ssh connection. The block runs whether or not the boot got ready
    (``vm.result`` says which)."""
    need_tools("ssh")
    key = client_key(cache)
    port = free_port()
    nic = ("-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22")
    run = Run(machine.with_(extra_args=(*nic, *machine.extra_args)), marker=marker, serial_log=serial_log)
    config = Path(cache_dir(cache, "vm") / "ssh" / f"config-{port}")
    try:
        write_ssh_config(config, port, key)
        session = Session(run, None, port, key, config)
        run.watch(timeout=timeout, stay_up=True, ready=None if marker is not None else session.probe_ssh)
        session.result = run.result()
        if session.result.ok and wait_ssh and marker is not None:
            session.wait_ssh()
        yield session
        if run.running and session.result.ok:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(session.ssh_argv("systemctl", "--no-block", "poweroff"),
                               capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
            if not run.wait_exit(30):
                run.powerdown(30)
    finally:
        run.stop()
        config.unlink(missing_ok=True)


__all__ = ["Session", "running", "client_key", "authorized_keys", "HOST_ALIAS"]
