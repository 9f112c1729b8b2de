"""A disk image's GPT partitions, read with sfdisk (what ``install``/``status``/``gc`` and the
tests' disk edits need to find the ESP and the data partition of a disk ``bootimg disk`` made)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from ..host import HostError, need_tools

SECTOR = 512
DATA_LABEL = "bootimg-data"
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


@dataclass(frozen=True)
class Partition:
    name: str
    offset: int          # bytes from the start of the disk
    size: int
    type: str
    uuid: str


def partitions(disk: str | os.PathLike[str]) -> dict[str, Partition]:
    """The GPT partitions of a raw disk image, by name (``sfdisk --json``); {} for a disk with no
    partition table (a bare file system)."""
    need_tools("sfdisk")
    proc = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    table = json.loads(proc.stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", SECTOR))
    return {p.get("name", ""): Partition(p.get("name", ""), int(p["start"]) * sector, int(p["size"]) * sector,
                                         p["type"].lower(), p.get("uuid", "").lower())
            for p in table.get("partitions", [])}


def data_partition_offset(disk: str | os.PathLike[str]) -> int:
    """Where the data partition's file system starts: the ``bootimg-data`` partition of a disk
    ``make_disk`` wrote, or 0 for a bare ext4 image."""
    parts = partitions(disk)
    if not parts:
        return 0
    if DATA_LABEL not in parts:
        raise HostError(f"no {DATA_LABEL} partition on this disk", file=str(disk))
    return parts[DATA_LABEL].offset


