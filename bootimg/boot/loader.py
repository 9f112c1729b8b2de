"""The loader's side of the boot contract: Boot Loader Specification entries on the ESP, one
per installed release, with systemd-boot's boot counting.

An entry is ``loader/entries/bootimg-NAME-VERSION[+LEFT[-DONE]].conf``; its kernel and
initramfs are ``bootimg/NAME/VERSION/{vmlinuz,initrd.img}`` on the ESP. A new release's entry
carries ``+TRIES``: systemd-boot counts each try down (``+2-1``, ``+1-2``, ...), a release whose
tries are used up (``+0-N``) is *bad* and sorted after every other entry, so the loader falls
back to the previous good one; ``systemd-bless-boot`` drops the counter after a good boot
(``boot-complete.target``), which makes the entry *good*. An entry without a counter is good.
The ESP's entries are the truth of what is installed: ``status`` and ``gc`` read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENTRIES_DIR = "loader/entries"
LOADER_CONF = "loader/loader.conf"
ENTRY_PREFIX = "bootimg-"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")
_COUNTER = re.compile(r"^(?P<id>.+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")


@dataclass(frozen=True)
class EntryName:
    """An entry file's name: its id and its boot counters (None: not counted)."""

    id: str
    left: int | None = None
    done: int | None = None

    @classmethod
    def parse(cls, filename: str) -> EntryName | None:
        m = _COUNTER.match(filename)
        if m is None:
            return None
        left, done = m.group("left"), m.group("done")
        return cls(m.group("id"), int(left) if left is not None else None, int(done) if done is not None else None)

    @property
    def filename(self) -> str:
        counter = "" if self.left is None else f"+{self.left}" + ("" if self.done is None else f"-{self.done}")
        return f"{self.id}{counter}.conf"

    @property
    def state(self) -> str:
        """good (no counter: blessed, or never counted), bad (no tries left) or trying."""
        if self.left is None:
            return "good"
        return "bad" if self.left == 0 else "trying"


def entry_id(name: str, version: str) -> str:
    eid = f"{ENTRY_PREFIX}{name}-{version}"
    if not _ID.match(eid) or "+" in eid:
        raise ValueError(f"release name/version {name!r}/{version!r} cannot name a boot entry")
    return eid


def kernel_dir(name: str, version: str) -> str:
    """Where an entry's kernel and initramfs live on the ESP (relative to it)."""
    return f"bootimg/{name}/{version}"


def kernel_cmdline(release: dict, root_partuuid: str, release_path: str) -> str:
    """The kernel command line of a release's entry: the data partition, the root image's digest,
    where the release is, its rollback index, then the manifest's kernel arguments."""
    args = [f"root=PARTUUID={root_partuuid}", "rw", release["root"]["kernel_argument"],
            f"bootimg.release={release_path}", f"bootimg.security_version={int(release.get('security_version', 0))}"]
    for arg in release.get("kernel_arguments", []):
        if arg not in args:
            args.append(arg)
    return " ".join(args)


def loader_conf(name: str) -> str:
    return (f"# bootimg: boot the newest good bootimg entry at once; no command-line editing (it would\n"
            f"# bypass composefs.digest= and the kernel arguments the release was built for).\n"
            f"timeout 0\ndefault {ENTRY_PREFIX}{name}-*\neditor no\nauto-entries no\nauto-firmware no\n")


def type1_entry(release: dict, cmdline: str) -> str:
    """A Type #1 entry for ``release`` (release.json) booting ``cmdline``."""
    base = "/" + kernel_dir(release["name"], release["version"])
    return (f"title {release['name']} {release['version']}\nversion {release['version']}\n"
            f"sort-key {ENTRY_PREFIX}{release['name']}\n"
            f"linux {base}/vmlinuz\ninitrd {base}/initrd.img\noptions {cmdline}\n")


def parse_entry(text: str) -> dict[str, str]:
    """An entry file's keys (the first of each)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.setdefault(key, value.strip())
    return out


def cmdline_value(cmdline: str, key: str) -> str | None:
    """The value of ``key=`` on a kernel command line (the last one)."""
    found = None
    for arg in cmdline.split():
        if arg.startswith(key + "="):
            found = arg[len(key) + 1:]
    return found
