"""How the verifier reaches a systemd: one interface, several targets, two data paths.

Targets: the local system bus, an nspawn container (its bus socket through ``/proc/PID/root``),
a remote board over ssh (the way ``systemd-analyze -H`` reaches it: ssh + ``systemd-stdio-bridge``),
or any D-Bus address. Data paths: pystemd (one shared sd-bus connection, one ``GetAll`` per
object, no introspection) or, where pystemd is not available, ``busctl --json=short`` (for ssh
all calls go in ONE ssh session). A recorded property set replays a collection for tests.

Every transport answers three things: the properties of a list of objects, the contents of a
few small files on the target, and (for history) a command run on the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import BootimgError

DEST = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
# Files read from the target with every collection.
TARGET_FILES = ("/proc/sys/kernel/random/boot_id", "/proc/cmdline", "/run/bootimg/booted.json")


class TransportError(BootimgError):
    """The target could not be reached or did not answer: the boot could not be measured (exit 2)."""

    exit_code = 2


def bus_label_escape(name: str) -> str:
    """sd-bus's bus_label_escape(): every byte but [A-Za-z0-9] as _XX (lowercase hex)."""
    if not name:
        return "_"
    out = []
    for i, b in enumerate(name.encode()):
        c = chr(b)
        if ("a" <= c <= "z") or ("A" <= c <= "Z") or (i > 0 and "0" <= c <= "9"):
            out.append(c)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)


def unit_path(unit: str) -> str:
    return UNIT_PREFIX + bus_label_escape(unit)


def plain(value: Any) -> Any:
    """pystemd's bytes and tuples as JSON-ready str and lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def unwrap_busctl(value: Any) -> Any:
    """busctl --json=short's {"type": T, "data": D} (recursively for variants) as plain data."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return unwrap_busctl(value["data"])
    if isinstance(value, dict):
        return {k: unwrap_busctl(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_busctl(v) for v in value]
    return value


class Transport:
    """Base: subclasses implement ``get_all_many``, ``read_files`` and ``run``."""

    via = "?"  # pystemd | busctl | recorded

    def __init__(self, target: str):
        self.target = target

    def describe(self) -> str:
        return f"{self.via}:{self.target}"

    def get_all_many(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        """All properties (every interface) of each object path, in order."""
        raise NotImplementedError

    def read_files(self, paths: Sequence[str]) -> dict[str, str | None]:
        """The text of each file on the target, None where it does not exist."""
        raise NotImplementedError

    def run(self, argv: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command on the target (e.g. journalctl), capturing text."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- where a target's files and commands are --------------------------------------------------

class _Place:
    """Files and commands: locally, under a container's /proc/PID/root, or over ssh."""

    def read_files(self, paths: Sequence[str]) -> dict[str, str | None]:
        raise NotImplementedError

    def run(self, argv: Sequence[str], *, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        raise NotImplementedError


def _local_read(paths: Iterable[str], root: str = "") -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in paths:
        try:
            out[p] = Path(root + p).read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            out[p] = None
        except OSError as e:
            raise TransportError(f"cannot read {root + p}: {e.strerror or e}") from None
    return out


def _run(argv: Sequence[str], what: str, timeout: float, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError:
        raise TransportError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise TransportError(f"{what}: no answer within {timeout:.0f} s") from None


class LocalPlace(_Place):
    def read_files(self, paths: Sequence[str]) -> dict[str, str | None]:
        return _local_read(paths)

    def run(self, argv, *, timeout=120, input=None):
        return _run(argv, "local", timeout, input)


class ContainerPlace(_Place):
    """A running container, by the host PID of its init: files via /proc/PID/root, commands via nsenter."""

    def __init__(self, pid: int):
        self.pid = pid

    @property
    def root(self) -> str:
        return f"/proc/{self.pid}/root"

    def read_files(self, paths: Sequence[str]) -> dict[str, str | None]:
        return _local_read(paths, self.root)

    def run(self, argv, *, timeout=120, input=None):
        return _run(["nsenter", "-t", str(self.pid), "-a", *argv], f"container {self.pid}", timeout, input)


class SshPlace(_Place):
    """A board over ssh: ``host`` is an ssh destination ([user@]host), ``config`` an ssh config file."""

    def __init__(self, host: str, config: str | os.PathLike[str] | None = None, port: int | None = None,
                 options: Sequence[str] = (), connect_timeout: int = 10):
        self.host, self.config, self.port = host, config, port
        self.options = list(options)
        self.connect_timeout = connect_timeout
        self.stderr_log: Path | None = None  # ssh's stderr while pystemd's bridge runs

    def ssh_argv(self) -> list[str]:
        argv = ["ssh"]
        if self.config:
            argv += ["-F", str(self.config)]
        if self.port:
            argv += ["-p", str(self.port)]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", *self.options]
        return argv

    def run(self, argv, *, timeout=120, input=None):
        cmd = " ".join(shlex.quote(a) for a in argv)
        proc = _run([*self.ssh_argv(), self.host, cmd], f"ssh {self.host}", timeout, input)
        if proc.returncode == 255:
            raise TransportError(f"ssh {self.host}: cannot connect: {_last_line(proc.stderr)}")
        return proc

    def script(self, text: str, *, timeout: float = 120) -> str:
        """Run a POSIX sh script on the target in one ssh session; its stdout."""
        proc = _run([*self.ssh_argv(), self.host, "sh", "-s"], f"ssh {self.host}", timeout, text)
        if proc.returncode == 255:
            raise TransportError(f"ssh {self.host}: cannot connect: {_last_line(proc.stderr)}")
        if proc.returncode != 0:
            raise TransportError(f"ssh {self.host}: script failed ({proc.returncode}): {_last_line(proc.stderr)}")
        return proc.stdout

    def read_files(self, paths: Sequence[str]) -> dict[str, str | None]:
        tag = "@@bootimg-" + secrets.token_hex(8)
        lines = [f"for f in {' '.join(shlex.quote(p) for p in paths)}; do",
                 f'  if [ -r "$f" ]; then echo "{tag} F $f"; cat "$f"; echo; else echo "{tag} N $f"; fi',
                 "done"]
        return _split_files(self.script("\n".join(lines) + "\n"), tag, paths)


def _split_files(out: str, tag: str, paths: Sequence[str]) -> dict[str, str | None]:
    result: dict[str, str | None] = {p: None for p in paths}
    current, buf = None, []
    for line in out.split("\n"):
        if line.startswith(tag + " "):
            if current is not None:
                result[current] = "\n".join(buf)[:-1] if buf else ""
            kind, name = line[len(tag) + 1:].split(" ", 1)
            current, buf = (name if kind == "F" else None), []
        elif current is not None:
            buf.append(line)
    if current is not None:
        result[current] = "\n".join(buf)[:-1] if buf else ""
    return result


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no message"


# -- pystemd ----------------------------------------------------------------------------------

def pystemd_available() -> bool:
    try:
        import pystemd.dbuslib  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _ssh_on_path(place: SshPlace):
    """sd_bus_open_system_remote() execs plain ``ssh -xT HOST systemd-stdio-bridge`` from PATH
    (systemd 252 ignores $SYSTEMD_SSH): a wrapper first in PATH adds our config and options."""
    real = shutil.which("ssh")
    if real is None:
        raise TransportError("ssh not found (Debian: openssh-client)")
    with tempfile.TemporaryDirectory(prefix="bootimg-kpi-ssh-") as d:
        wrapper = Path(d) / "ssh"
        extra = " ".join(shlex.quote(a) for a in place.ssh_argv()[1:])
        # ssh's own complaints go to a file that the error message quotes (one line, not two).
        place.stderr_log = Path(d) / "stderr"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(real)} {extra} "$@" 2>>{shlex.quote(str(place.stderr_log))}\n')
        wrapper.chmod(stat.S_IRWXU)
        old = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{d}:{old}"
        try:
            yield
        finally:
            os.environ["PATH"] = old


class PystemdTransport(Transport):
    """One shared sd-bus connection through pystemd; one Properties.GetAll("") call per object."""

    via = "pystemd"

    def __init__(self, kind: str, target: str, place: _Place, *, address: str | None = None):
        super().__init__(f"{kind} {target}")
        from pystemd.dbuslib import DBus, DBusAddress, DBusRemote

        self.place = place
        self._ssh_ctx = None
        try:
            if kind == "local":
                self.bus = DBus()
            elif kind == "ssh":
                assert isinstance(place, SshPlace)
                self._ssh_ctx = _ssh_on_path(place)
                self._ssh_ctx.__enter__()
                self.bus = DBusRemote(place.host.encode())
            else:
                self.bus = DBusAddress(address.encode(), False)  # type: ignore[union-attr]
            self.bus.open()
        except Exception as e:  # pystemd raises DBusError subclasses; keep one line
            self._close_ssh()
            raise TransportError(f"cannot open the system bus of {self.target}: {_dbus_msg(e)}") from None

    def get_all_many(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        from pystemd.dbuslib import apply_signature

        out = []
        args = apply_signature(b"s", [b""])  # "": the properties of every interface
        for p in paths:
            try:
                body = self.bus.call_method(DEST.encode(), p.encode(), b"org.freedesktop.DBus.Properties",
                                            b"GetAll", args).body
            except Exception as e:
                why = _dbus_msg(e)
                log = getattr(self.place, "stderr_log", None)
                if log is not None and log.exists() and log.read_text().strip():
                    why = f"cannot connect: {_last_line(log.read_text())} ({why})"
                raise TransportError(f"{self.target}: GetAll {p}: {why}") from None
            out.append(plain(body[0] if isinstance(body, tuple) else body))
        return out

    def read_files(self, paths):
        return self.place.read_files(paths)

    def run(self, argv, *, timeout=120):
        return self.place.run(argv, timeout=timeout)

    def _close_ssh(self) -> None:
        if self._ssh_ctx is not None:
            self._ssh_ctx.__exit__(None, None, None)
            self._ssh_ctx = None

    def close(self) -> None:
        bus, self.bus = getattr(self, "bus", None), None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.close()
        self._close_ssh()


def _dbus_msg(e: Exception) -> str:
    """pystemd's DBusError as one readable line: "ENOTCONN: Transport endpoint is not connected"."""
    import re

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"b'([^']*)'", r"\1", text)
    m = re.match(r"(?:System\.Error\.)?(\w+)\[err -?\d+\]: (.*)", text)
    return f"{m.group(1)}: {m.group(2)}" if m else text.strip()


# -- busctl (no pystemd) ----------------------------------------------------------------------

class BusctlTransport(Transport):
    """``busctl --json=short call ... GetAll s ""``: locally, at an address, or all in one ssh session."""

    via = "busctl"

    def __init__(self, kind: str, target: str, place: _Place, *, address: str | None = None):
        super().__init__(f"{kind} {target}")
        self.place, self.kind, self.address = place, kind, address

    def _busctl(self) -> list[str]:
        return ["busctl", "--json=short"] + ([f"--address={self.address}"] if self.address else [])

    def get_all_many(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        if isinstance(self.place, SshPlace):
            return self._get_all_ssh(paths)
        out = []
        for p in paths:
            proc = _run([*self._busctl(), "call", DEST, p, "org.freedesktop.DBus.Properties", "GetAll", "s", ""],
                        f"busctl {self.target}", 60)
            if proc.returncode != 0:
                raise TransportError(f"{self.target}: busctl GetAll {p}: {_last_line(proc.stderr)}")
            out.append(_parse_getall(proc.stdout, p, self.target))
        return out

    def _get_all_ssh(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        tag = "@@bootimg-" + secrets.token_hex(8)
        script = [f"for p in {' '.join(shlex.quote(p) for p in paths)}; do",
                  f'  echo "{tag} F $p"',
                  f'  busctl --json=short call {DEST} "$p" org.freedesktop.DBus.Properties GetAll s "" 2>&1'
                  f' || echo "{tag} E $p"',
                  "  echo",  # busctl --json=short ends without a newline
                  "done"]
        assert isinstance(self.place, SshPlace)
        parts = _split_files(self.place.script("\n".join(script) + "\n"), tag, paths)
        out = []
        for p in paths:
            text = parts.get(p)
            if text is None:
                raise TransportError(f"{self.target}: busctl GetAll {p} failed")
            out.append(_parse_getall(text, p, self.target))
        return out

    def read_files(self, paths):
        return self.place.read_files(paths)

    def run(self, argv, *, timeout=120):
        return self.place.run(argv, timeout=timeout)


def _parse_getall(text: str, path: str, target: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
        return unwrap_busctl(data["data"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise TransportError(f"{target}: busctl GetAll {path}: unexpected output: {_last_line(text)}") from None


# -- recorded ---------------------------------------------------------------------------------

class RecordedTransport(Transport):
    """Replays a property set written by ``kpi collect --record`` (tests, offline analysis)."""

    via = "recorded"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(str(path))
        try:
            data = json.loads(Path(path).read_text())
            self.objects: dict[str, dict[str, Any]] = data["objects"]
            self.files: dict[str, str | None] = data.get("files", {})
            self.recorded_from: str = data.get("source", "?")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BootimgError(f"not a recorded property set: {e}", file=str(path)) from None

    def describe(self) -> str:
        return f"recorded:{Path(self.target).name} (from {self.recorded_from})"

    def get_all_many(self, paths):
        out = []
        for p in paths:
            if p not in self.objects:
                # What systemd answers for a unit it has no file for.
                name = p[len(UNIT_PREFIX):]
                out.append({"Id": name, "LoadState": "not-found", "ActiveState": "inactive",
                            "SubState": "dead"})
            else:
                out.append(self.objects[p])
        return out

    def read_files(self, paths):
        return {p: self.files.get(p) for p in paths}

    def run(self, argv, *, timeout=120):
        raise TransportError("a recorded property set cannot run commands")


class Recorder(Transport):
    """Wraps a transport and keeps every answer, to write a recorded property set."""

    def __init__(self, inner: Transport):
        super().__init__(inner.target)
        self.inner = inner
        self.via = inner.via
        self.objects: dict[str, Any] = {}
        self.files: dict[str, Any] = {}

    def describe(self) -> str:
        return self.inner.describe()

    def get_all_many(self, paths):
        res = self.inner.get_all_many(paths)
        self.objects.update(zip(paths, res))
        return res

    def read_files(self, paths):
        res = self.inner.read_files(paths)
        self.files.update(res)
        return res

    def run(self, argv, *, timeout=120):
        return self.inner.run(argv, timeout=timeout)

    def close(self) -> None:
        self.inner.close()

    def dump(self) -> dict[str, Any]:
        return {"source": self.inner.describe(), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "objects": self.objects, "files": self.files}


# -- opening a target -------------------------------------------------------------------------

def container_init_pid(spec: str) -> int:
    """The host PID of a running container's init: ``spec`` is that PID or the container's root directory."""
    if spec.isdigit():
        pid = int(spec)
        if not Path(f"/proc/{pid}").exists():
            raise TransportError(f"container: no process {pid}")
        return pid
    root = os.path.realpath(spec)
    if not os.path.isdir(root):
        raise TransportError(f"container: {spec} is neither a PID nor a directory")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/root") != root:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if nspid and nspid[-1] == "1":
            return int(entry)
    raise TransportError(f"container: no running container has its root at {spec}")


def open_transport(*, local: bool = False, container: str | None = None, ssh: str | None = None,
                   ssh_config: str | None = None, ssh_port: int | None = None, address: str | None = None,
                   via: str = "auto") -> Transport:
    """Open exactly one target. ``via``: pystemd, busctl, or auto (pystemd when installed)."""
    chosen = [n for n, v in (("local", local), ("container", container), ("ssh", ssh), ("address", address)) if v]
    if len(chosen) != 1:
        raise BootimgError("name exactly one target: --local, --container ROOT|PID, --ssh HOST or --address ADDR")
    if via not in ("auto", "pystemd", "busctl"):
        raise BootimgError(f"--via must be auto, pystemd or busctl, not {via!r}")
    if via == "auto":
        via = "pystemd" if pystemd_available() else "busctl"
    elif via == "pystemd" and not pystemd_available():
        raise BootimgError("pystemd is not installed (pip install pystemd; it builds against libsystemd-dev)")
    cls = PystemdTransport if via == "pystemd" else BusctlTransport
    if local:
        return cls("local", "system bus", LocalPlace())
    if container:
        pid = container_init_pid(container)
        addr = f"unix:path=/proc/{pid}/root/run/dbus/system_bus_socket"
        return cls("container", f"pid {pid}", ContainerPlace(pid), address=addr)
    if ssh:
        place = SshPlace(ssh, ssh_config, ssh_port)
        if cls is BusctlTransport:
            return cls("ssh", ssh, place)
        return cls("ssh", ssh, place)
    assert address
    return cls("address", address, LocalPlace(), address=address)
