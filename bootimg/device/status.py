"""``bootimg status``: what is installed, booted and next, as the loader's entries say.

Installed releases in the loader's order (bad ones last), each good (blessed, or never
counted), trying (tries left) or bad (tries used up); the release booted (on the device:
booted.json and the loader's LoaderEntrySelected) and the one the loader boots next; the
rollback minimum; the shared store's size and what the releases share in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..boot.loader import EntryName
from ..composefs.store import ObjectStore
from . import installed
from .gc import referenced_objects
from .install import rollback_minimum
from .target import Target


@dataclass
class Status:
    where: str
    releases: list[dict] = field(default_factory=list)
    booted: dict | None = None
    next_boot: str | None = None
    rollback_minimum: int = 0
    rollback_store: str = ""
    store: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"where": self.where, "releases": self.releases, "booted": self.booted, "next_boot": self.next_boot,
                "rollback": {"minimum": self.rollback_minimum, "store": self.rollback_store}, "store": self.store}


def status(target: Target) -> Status:
    st = Status(where=target.where)
    items = installed.list_installed(target)
    st.releases = [installed.json_ready(i) for i in items]
    nxt = next((i for i in items if i.state != "bad"), None)
    st.next_boot = nxt.entry.filename if nxt else None
    if target.booted:
        selected = installed.loader_entry_selected()
        st.booted = {"release": target.booted.get("release"), "digest": target.booted.get("digest"),
                     "entry": selected, "id": _entry_id(selected),
                     "security_version": target.booted.get("security_version")}
    st.rollback_minimum, st.rollback_store = rollback_minimum(target)
    store = ObjectStore(target.data.objects, fsync=False, on_notice=lambda _m: None)
    sizes = {d: _size(p) for d, p in store.iter_objects()} if target.data.objects.is_dir() else {}
    per: dict[str, set[bytes]] = {}
    for item in items:
        if item.dir is not None and item.release_path not in per:
            per[item.release_path] = referenced_objects(target, item.dir)
    users: dict[bytes, int] = {}
    for objs in per.values():
        for d in objs:
            users[d] = users.get(d, 0) + 1
    st.store = {
        "objects": len(sizes), "bytes": sum(sizes.values()),
        "unreferenced_objects": sum(1 for d in sizes if d not in users),
        "shared_objects": sum(1 for d, n in users.items() if n > 1 and d in sizes),
        "shared_bytes": sum(sizes.get(d, 0) for d, n in users.items() if n > 1),
        "per_release": {path: {"objects": len(objs), "bytes": sum(sizes.get(d, 0) for d in objs),
                               "missing": sum(1 for d in objs if d not in sizes)} for path, objs in sorted(per.items())},
    }
    return st


def _entry_id(selected: str | None) -> str | None:
    """The booted entry's id without its counter: systemd 252's LoaderEntrySelected is the file
    name as it was at boot (``bootimg-N-V+3.conf``), newer systemd-boot's the id."""
    if not selected:
        return None
    parsed = EntryName.parse(selected)
    return parsed.id if parsed else selected


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def render(st: Status) -> str:
    lines = [f"{st.where}:"]
    if not st.releases:
        lines.append("  no bootimg entries on the ESP")
    for r in st.releases:
        tries = "" if r["tries_left"] is None else f", {r['tries_left']} tries left"
        mark = []
        if st.next_boot == r["entry"]:
            mark.append("next boot")
        if st.booted and st.booted.get("release") == r["release_path"]:
            mark.append("booted")
        lines.append(f"  {r['version']:<12} {r['state']:<7} security_version {r['security_version']}{tries}  "
                     f"{r['entry']}" + (f"  [{', '.join(mark)}]" if mark else "")
                     + ("" if r["release_present"] else "  (release directory missing)"))
        if r["state"] != "good":
            lines.append(f"      {r['reason']}")
    lines.append(f"  rollback minimum {st.rollback_minimum} ({st.rollback_store})")
    s = st.store
    lines.append(f"  store: {s['objects']} objects, {s['bytes']} bytes; shared by several releases: "
                 f"{s['shared_objects']} objects, {s['shared_bytes']} bytes; unreferenced: {s['unreferenced_objects']}")
    return "\n".join(lines)
