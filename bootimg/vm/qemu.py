"""Boot a machine under QEMU and watch its serial console, line by line with host timestamps.

A ``Machine`` is either a UEFI machine booting a disk (OVMF/AAVMF firmware, the disk's own
systemd-boot: what ``bootimg disk`` makes) or a direct kernel boot (``-kernel``/``-initrd``/
``-append``, for comparisons and for extra kernel arguments). ``boot()`` starts QEMU (TCG, or
KVM when asked and available), watches the console and ends the run at the first of:

* ``ready``     the readiness marker line, when the caller gives one (then waits for the guest's
                poweroff when the command line asks for it, else stops QEMU);
* ``panic``     "Kernel panic - not syncing";
* ``emergency`` an emergency shell (dracut's in the initramfs, or systemd's emergency.target);
                ``BootResult.stage`` tells which;
* ``timeout``   the watchdog: nothing conclusive within ``timeout`` seconds;
* ``exited``    QEMU ended by itself before any of the above (e.g. a guest poweroff/reboot);
* ``qemu-error`` QEMU refused to start (bad option, missing file); its stderr is in ``error``.

QEMU always runs in its own process group and is killed on every path out, exceptions included.
``Run.powerdown()`` presses the ACPI power button through QMP (a clean shutdown).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import arch as archmod
from ..host import SETUP_HINT, HostError, stderr_log

QEMU = archmod.X86_64.qemu
MIN_QEMU = (8, 0)
DEFAULT_TIMEOUT = 180.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
PANIC_RE = re.compile(r"Kernel panic - not syncing")
EMERGENCY_RE = re.compile(
    r"Entering emergency mode|You are in emergency mode|Give root password for maintenance|"
    r"Cannot open access to console, the root account is locked|Reached target .*Emergency Mode|"
    r"Starting .*[Ee]mergency [Ss]hell|Could not boot\.|dracut Warning: .*Could not boot")
INITRD_RE = re.compile(r"\(Initramfs\)!|Reached target .*Initrd Default Target|Running in initrd")
SWITCH_ROOT_RE = re.compile(r"Switching root\.|Reached target .*Switch Root")
STARTUP_RE = re.compile(r"Startup finished in (?P<parts>.*?) = (?P<total>[\d.]+)s")
PART_RE = re.compile(r"([\d.]+)s \((\w+)\)")
# The guest kernel's report of a timer interrupt that TCG never delivered to a vCPU (its thread
# starved on a loaded 2-core host): from then on every RCU grace period waits out a 21 s stall and
# the boot crawls past any timeout, whatever the system under test does. A fault of the emulator.
EMULATOR_FAULT_RE = re.compile(r"rcu: .*timer wakeup didn't happen")


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str = QEMU) -> tuple[int, ...]:
    path = shutil.which(binary)
    if path is None:
        raise HostError(f"{binary} not found: install QEMU >= 8 (qemu-system-x86 or qemu-system-arm; on "
                         f"bookworm from bookworm-backports); {SETUP_HINT}")
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise HostError(f"cannot tell the version of {path}: {out.strip()[:80]!r}")
    return tuple(int(g or 0) for g in m.groups())


def check_qemu(binary: str = QEMU) -> tuple[int, ...]:
    version = qemu_version(binary)
    if version[:2] < MIN_QEMU:
        raise HostError(
            f"QEMU {'.'.join(map(str, version))} is too old: bootimg needs >= {MIN_QEMU[0]} "
            f"(bookworm's 7.2 crashes the 6.12 guest under TCG); install qemu-system-x86 from "
            f"bookworm-backports: {SETUP_HINT}")
    return version


@dataclass
class BootResult:
    """What one boot showed. ``duration``: host seconds from QEMU start to the marker (or to the
    end of the run when there is no marker)."""

    exit_reason: str
    console: str
    marker: str | None
    duration: float
    wall: float
    stage: str
    lines: list[tuple[float, str]] = field(default_factory=list, repr=False)
    returncode: int | None = None
    error: str = ""
    cmdline: str = ""
    argv: list[str] = field(default_factory=list, repr=False)
    serial_log: Path | None = None
    emulator_faults: int = 0            # earlier runs of this boot lost to an emulator fault (retried)

    @property
    def ok(self) -> bool:
        return self.exit_reason == "ready"

    @property
    def emulator_fault(self) -> bool:
        """The console shows a fault of the emulator, not of the system (EMULATOR_FAULT_RE)."""
        return any(EMULATOR_FAULT_RE.search(line) for _, line in self.lines)

    @property
    def startup(self) -> dict[str, float]:
        """The marker's "Startup finished in" parts: kernel, initrd, userspace, total (seconds)."""
        if not self.marker:
            return {}
        m = STARTUP_RE.search(self.marker)
        if not m:
            return {}
        parts = {name: float(v) for v, name in PART_RE.findall(m.group("parts"))}
        parts["total"] = float(m.group("total"))
        return parts

    def line_time(self, pattern: str) -> float | None:
        """Host time (s since QEMU start) of the first console line matching ``pattern``."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def summary(self) -> str:
        if self.ok:
            return f"ready in {self.duration:.1f} s: {self.marker}"
        detail = {"panic": "kernel panic", "emergency": f"emergency shell ({self.stage})",
                  "timeout": f"no marker within the timeout ({self.stage})",
                  "exited": f"QEMU exited (code {self.returncode}) before the marker ({self.stage})",
                  "qemu-error": f"QEMU failed: {self.error}"}.get(self.exit_reason, self.exit_reason)
        last = next((line for _, line in reversed(self.lines) if line.strip()), "")
        return f"{detail} after {self.wall:.1f} s" + (f"; last line: {last.strip()[:160]}" if last else "")


class _Reader(threading.Thread):
    """Reads QEMU's stdout (the serial console), splits lines and timestamps them."""

    def __init__(self, fd: int, t0: float, tee=None):
        super().__init__(daemon=True)
        self.fd, self.t0, self.tee = fd, t0, tee
        self.lines: list[tuple[float, str]] = []
        self.partial = ""
        self.raw = bytearray()
        self.cond = threading.Condition()
        self.eof = False

    def run(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                now = time.monotonic() - self.t0
                if self.tee is not None:  # the console as it happens (follow it with tail -f)
                    self.tee.write(chunk)
                    self.tee.flush()
                with self.cond:
                    self.raw += chunk
                    text = self.partial + chunk.decode("utf-8", errors="replace")
                    *done, self.partial = text.split("\n")
                    self.lines.extend((now, _ANSI.sub("", line)) for line in done)
                    self.cond.notify_all()
        finally:
            if self.tee is not None:
                self.tee.close()
            with self.cond:
                if self.partial:
                    self.lines.append((time.monotonic() - self.t0, _ANSI.sub("", self.partial)))
                    self.partial = ""
                self.eof = True
                self.cond.notify_all()

    def tail_text(self) -> str:
        return _ANSI.sub("", self.partial)


@dataclass(frozen=True)
class Machine:
    """What QEMU runs: a UEFI machine booting ``disk`` (no ``kernel``), or a direct kernel boot."""

    disk: Path | None = None
    disk_format: str = "raw"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    arch: archmod.Arch = archmod.X86_64
    efi_vars: Path | None = None       # a persistent UEFI variable store (default: a fresh copy per run)
    memory: int = 2048
    smp: int = 2
    cpu: str | None = None             # -cpu under TCG (default: the architecture's, Arch.qemu_cpu)
    snapshot: bool = True              # the guest's writes go to a throw-away overlay
    kvm: bool = False                  # use KVM when /dev/kvm works (else TCG)
    tpm_state: Path | None = None      # a TPM 2.0 (swtpm) keeping its state in this directory
    reboot: bool = False               # a guest reboot restarts it in the same QEMU (else QEMU exits)
    extra_args: tuple[str, ...] = ()

    @property
    def uefi(self) -> bool:
        return self.kernel is None

    def with_(self, **changes) -> Machine:
        return dataclasses.replace(self, **changes)


def firmware(arch: archmod.Arch) -> tuple[Path, Path]:
    """The UEFI firmware code and variable-store template for ``arch`` (Debian's ovmf / AAVMF)."""
    for code, vars_ in zip(arch.firmware_code, arch.firmware_vars):
        if os.path.isfile(code) and os.path.isfile(vars_):
            return Path(code), Path(vars_)
    package = "ovmf" if arch is archmod.X86_64 else "qemu-efi-aarch64"
    raise HostError(f"no UEFI firmware for {arch.name} ({arch.firmware_code[0]}): install {package}; {SETUP_HINT}")


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_argv(machine: Machine, *, efi_vars: Path | None = None, qmp: Path | None = None,
              tpm_socket: Path | None = None) -> list[str]:
    """QEMU's command line for ``machine``; ``efi_vars`` is the variable store this run uses,
    ``tpm_socket`` the control socket of its swtpm."""
    m = machine
    accel = "kvm" if m.kvm and kvm_usable() and m.arch.uname == os.uname().machine else "tcg"
    argv = [m.arch.qemu, *m.arch.qemu_machine, "-accel", accel, "-cpu", "host" if accel == "kvm" else (m.cpu or m.arch.qemu_cpu),
            "-m", str(m.memory), "-smp", str(m.smp), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", *([] if m.reboot else ["-no-reboot"])]
    if tpm_socket is not None:
        device = "tpm-tis" if m.arch is archmod.X86_64 else "tpm-tis-device"
        argv += ["-chardev", f"socket,id=chrtpm,path={tpm_socket}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", f"{device},tpmdev=tpm0"]
    if m.uefi:
        if m.disk is None:
            raise HostError("a UEFI machine needs a disk to boot")
        code, _template = firmware(m.arch)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}"]
        if efi_vars is not None:
            argv += ["-drive", f"if=pflash,format=raw,unit=1,file={efi_vars}"]
    else:
        argv += ["-kernel", str(m.kernel), "-append", m.append]
        if m.initrd is not None:
            argv += ["-initrd", str(m.initrd)]
    if m.disk is not None:
        argv += ["-drive", f"file={m.disk},format={m.disk_format},if=virtio,cache=unsafe"]
    if m.snapshot:
        argv.append("-snapshot")
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if "-nic" not in m.extra_args and "-netdev" not in m.extra_args:
        # Always a network card (QEMU's user network): the root's network-online.target, which
        # containers may want, is reached at once instead of after wait-online's timeout.
        argv += ["-nic", "user,model=virtio-net-pci"]
    return argv + list(m.extra_args)


def boot(machine: Machine, *, timeout: float = DEFAULT_TIMEOUT, serial_log: str | os.PathLike[str] | None = None,
         marker: re.Pattern[str] | None = None, powers_off: bool = False, poweroff_grace: float = 30.0,
         emergency_grace: float = 3.0, fault_retries: int = 1) -> BootResult:
    """Boot ``machine`` and watch the console until the run is conclusive (see the module doc).

    ``marker``: the console line that means "ready" (without one, the run lasts until QEMU
    exits, a panic, an emergency shell or the timeout); ``powers_off``: the guest powers itself
    off after the marker (wait up to ``poweroff_grace`` for it). ``serial_log`` gets the raw console.

    A boot that did not get ready and whose console shows an emulator fault (EMULATOR_FAULT_RE)
    is run again, up to ``fault_retries`` times, when a run leaves nothing behind (a snapshot
    disk, the UEFI variables a fresh copy, no TPM state); the faulty console is kept as ``SERIAL_LOG.fault-N``
    and the result counts it in ``emulator_faults``.
    """
    repeatable = machine.snapshot and machine.efi_vars is None and machine.tpm_state is None
    attempt = 0
    while True:
        run = Run(machine, marker=marker, powers_off=powers_off, serial_log=serial_log)
        try:
            run.watch(timeout=timeout, poweroff_grace=poweroff_grace, emergency_grace=emergency_grace)
        finally:
            run.stop()
        result = run.result()
        result.emulator_faults = attempt
        if result.ok or not result.emulator_fault or not repeatable or attempt >= fault_retries:
            return result
        attempt += 1
        kept = ""
        if serial_log is not None and Path(serial_log).exists():
            kept = f"{serial_log}.fault-{attempt}"
            os.replace(serial_log, kept)
        stderr_log(f"QEMU: the guest lost a timer interrupt (an emulator fault{', console: ' + kept if kept else ''}); "
                   "booting again")


class Run:
    """One QEMU run: started by the constructor, watched by ``watch()``, ended by ``stop()``.

    ``boot()`` is watch-then-stop; ``session.running()`` keeps the machine up after it is ready
    and stops it when the caller is done with it."""

    def __init__(self, machine: Machine, *, marker: re.Pattern[str] | None = None, powers_off: bool = False,
                 serial_log: str | os.PathLike[str] | None = None):
        check_qemu(machine.arch.qemu)
        for label, path in (("kernel", machine.kernel), ("initrd", machine.initrd), ("disk", machine.disk)):
            if path is not None and not Path(path).is_file():
                raise HostError(f"{label} not found", file=str(path))
        self.machine = machine
        self.append = machine.append if not machine.uefi else ""
        self.marker = marker
        self.powers_off = powers_off
        self._scratch = tempfile.TemporaryDirectory(prefix="bootimg-qemu-")
        scratch = Path(self._scratch.name)
        efi_vars = None
        if machine.uefi:
            efi_vars = machine.efi_vars
            if efi_vars is None:
                efi_vars = scratch / "efivars.fd"
                shutil.copyfile(firmware(machine.arch)[1], efi_vars)
            elif not Path(efi_vars).is_file():
                shutil.copyfile(firmware(machine.arch)[1], efi_vars)
        self.qmp_path = scratch / "qmp.sock"
        self.swtpm = None
        tpm_socket = None
        if machine.tpm_state is not None:
            tpm_socket = scratch / "swtpm.sock"
            self.swtpm = start_swtpm(Path(machine.tpm_state), tpm_socket)
        self.argv = qemu_argv(machine, efi_vars=efi_vars, qmp=self.qmp_path, tpm_socket=tpm_socket)
        self.reason, self.found, self.t_found, self.stage = "", None, None, "firmware"
        self.wall = 0.0
        self._error = ""
        self._checked = 0
        self._exited = False
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("TMPDIR", "/var/tmp")  # -snapshot's overlay
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True, env=env)
        self.serial_log = Path(serial_log) if serial_log is not None else None
        tee = None
        if self.serial_log is not None:
            self.serial_log.parent.mkdir(parents=True, exist_ok=True)
            tee = open(self.serial_log, "wb")
        self.reader = _Reader(self.proc.stdout.fileno(), self.t0, tee)
        self.reader.start()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def watch(self, *, timeout: float = DEFAULT_TIMEOUT, poweroff_grace: float = 30.0,
              emergency_grace: float = 3.0, stay_up: bool = False,
              ready: Callable[[], bool] | None = None, ready_every: float = 2.0) -> str:
        """Follow the console until the run is conclusive; return the reason (see the module
        doc). With ``stay_up`` it returns at the marker and leaves the machine running.
        ``ready`` (called every ``ready_every`` s, e.g. an ssh probe) is a readiness test besides
        the marker: when it answers True the run is "ready"."""
        next_probe = time.monotonic() + ready_every
        reader, proc = self.reader, self.proc
        deadline = self.t0 + timeout
        stop_at: float | None = None
        while True:
            with reader.cond:
                if self._checked >= len(reader.lines) and not reader.eof and not self._exited:
                    reader.cond.wait(timeout=0.2)
                new = reader.lines[self._checked:]
                self._checked = len(reader.lines)
                eof = reader.eof
                pending = reader.tail_text()
            for t, line in new:
                self._follow_stage(line)
                if self.reason:
                    continue
                m = self.marker.search(line) if self.marker is not None else None
                if m:
                    self.reason, self.found, self.t_found = "ready", m.group(0).strip(), t
                    self.stage = "root"
                    if stay_up:
                        return self.reason
                    stop_at = (time.monotonic() + poweroff_grace) if self.powers_off else time.monotonic()
                elif PANIC_RE.search(line):
                    self.reason, self.t_found = "panic", t
                    stop_at = time.monotonic() + 5.0  # the rest of the panic report; panic=-1 exits
                elif EMERGENCY_RE.search(line):
                    self.reason, self.t_found = "emergency", t
                    stop_at = time.monotonic() + emergency_grace
            # A prompt without a newline ("Press Enter for maintenance", ":/#") only shows here.
            if not self.reason and pending and EMERGENCY_RE.search(pending):
                self.reason, self.t_found = "emergency", time.monotonic() - self.t0
                stop_at = time.monotonic() + emergency_grace
            if self._exited:  # the last lines after QEMU's exit are processed: done
                if not self.reason:
                    self.reason = "exited" if reader.lines or proc.returncode == 0 else "qemu-error"
                return self.reason
            now = time.monotonic()
            if eof or proc.poll() is not None:
                proc.wait()
                reader.join(timeout=5)
                self._exited = True
                continue
            if stop_at is not None and now >= stop_at:
                return self.reason
            if ready is not None and not self.reason and now >= next_probe:
                if ready():
                    self.reason, self.t_found, self.stage = "ready", time.monotonic() - self.t0, "root"
                    if stay_up:
                        return self.reason
                    stop_at = time.monotonic()
                next_probe = time.monotonic() + ready_every
            if not self.reason and now >= deadline:
                self.reason = "timeout"
                return self.reason

    def _follow_stage(self, line: str) -> None:
        stage = self.stage
        if "Linux version" in line or "Booting Linux" in line:      # also again after a reboot
            stage = "kernel"
        if stage in ("firmware", "kernel") and INITRD_RE.search(line):
            stage = "initramfs"
        if SWITCH_ROOT_RE.search(line) and stage != "root":
            stage = "switch-root"
        if stage == "switch-root" and ("Welcome to" in line or "systemd[1]" in line):
            stage = "root"
        self.stage = stage

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for QEMU to end by itself (a guest poweroff)."""
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def powerdown(self, timeout: float = 60.0) -> bool:
        """Press the ACPI power button (QMP ``system_powerdown``) and wait for QEMU to end."""
        if not self.running:
            return True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.qmp_path))
                f = sock.makefile("rw")
                f.readline()                                            # the greeting
                for cmd in ("qmp_capabilities", "system_powerdown"):
                    f.write(json.dumps({"execute": cmd}) + "\n")
                    f.flush()
                    while "return" not in json.loads(f.readline() or "{}") and self.running:
                        pass
        except (OSError, ValueError):
            return False
        return self.wait_exit(timeout)

    def stop(self) -> None:
        """Kill QEMU (if still running) and collect its stderr. Idempotent."""
        _kill(self.proc)
        if self.swtpm is not None:
            _kill(self.swtpm)
        self._scratch.cleanup()
        self.reader.join(timeout=5)
        self.wall = time.monotonic() - self.t0
        if not self._stderr.closed:
            self._stderr.seek(0)
            error = self._stderr.read().decode(errors="replace").strip()
            self._stderr.close()
            self._error = error.splitlines()[-1] if error else ""
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def result(self) -> BootResult:
        """What the run showed so far (call after ``stop()`` for the whole console)."""
        reason = self.reason
        if reason == "exited" and self.proc.returncode not in (0, None) and self._error:
            reason = "qemu-error"
        with self.reader.cond:
            lines = list(self.reader.lines)
        wall = self.wall or (time.monotonic() - self.t0)
        return BootResult(exit_reason=reason, console="\n".join(line for _, line in lines),
                          marker=self.found,
                          duration=self.t_found if self.t_found is not None else wall, wall=wall,
                          stage=self.stage, lines=lines, returncode=self.proc.returncode,
                          error=self._error, cmdline=self.append, argv=self.argv,
                          serial_log=self.serial_log)


def start_swtpm(state: Path, socket_path: Path) -> subprocess.Popen:
    """A software TPM 2.0 (Debian's swtpm) for one QEMU run, its state kept in ``state`` (so a
    counter written in one run is there in the next, like a real TPM across power cycles)."""
    if shutil.which("swtpm") is None:
        raise HostError(f"swtpm not found: install swtpm swtpm-tools; {SETUP_HINT}")
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                             "--ctrl", f"type=unixio,path={socket_path}", "--terminate"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise HostError(f"swtpm did not start (state {state})")
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
