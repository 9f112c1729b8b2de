#!/usr/bin/env python3
"""The example osbuild manifest, osbuild/example-manifest.json, and its inputs.

A small made-up system, the whole osbuild flow with upstream stages plus bootimg's:

    os              org.osbuild.untar         the root, from a tarball
    telemetry-image org.osbuild.copy          an OCI archive in a pipeline's tree
    release         org.bootimg.build         a signed release: the root + two containers (the
                                              OCI archive through org.osbuild.containers, a tar
                                              through org.osbuild.files), trusted keys, add_files
    disk-tree       org.bootimg.disk-tree     the ESP image and the data partition's files
    image           org.osbuild.truncate, .sfdisk, .write-device (the ESP), .mkfs.ext4, .copy
                                              (the data partition): disk.raw

Every input is inline (org.osbuild.inline, base64), so the manifest runs anywhere as is; the
inputs are made here, byte for byte the same every time (no host files, no compression). The
system does not boot: its root is a few files and a systemd that is only an ELF header, and
the kernel and initramfs are placeholders (a real disk takes them from `bootimg initramfs`).
The signing key is a development key for this example only.

    .venv/bin/python tools/osbuild_example.py            # rewrite osbuild/example-manifest.json
    .venv/bin/python tools/osbuild_example.py --inputs DIR   # the inputs as files + bootimg.yaml

``bootimg build DIR/bootimg.yaml -o OUT --key DIR/release-2026.key --no-boot-check`` makes the
release the "release" pipeline makes (the tests compare them byte for byte).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import uuid
from pathlib import Path

import yaml

from bootimg.arch import X86_64
from bootimg.disk.gpt import ESP_TYPE
from bootimg.disk.image import DATA_LABEL
from bootimg.signing import SecretKey

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "osbuild" / "example-manifest.json"
EPOCH = 1767225600
NAMESPACE = uuid.UUID("6b1d2f0e-8a57-4f0c-9c3e-5d2b7a1e4f90")
MiB = 1 << 20
SECTOR = 512
ESP_START, ESP_SIZE = MiB, 64 * MiB
DATA_START, DATA_SIZE = ESP_START + ESP_SIZE, 64 * MiB
DISK_SIZE = DATA_START + DATA_SIZE + MiB          # + the backup GPT
# An x86-64 ELF header: all the disk stage reads of the root's systemd (for the architecture).
ELF_HEADER = (b"\x7fELF\x02\x01\x01" + bytes(9) + (3).to_bytes(2, "little") + (62).to_bytes(2, "little")
              + (1).to_bytes(4, "little") + bytes(64 - 24))


def seeded_uuid(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


DISK_UUID, ESP_UUID, DATA_UUID = seeded_uuid("disk"), seeded_uuid("esp"), seeded_uuid("data")


def tar(entries: list[tuple[str, str, bytes, int, int]]) -> bytes:
    """A plain tar of (name, 'dir'|'file', content, mode, uid): owners numeric, every time EPOCH."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for name, kind, data, mode, uid in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = EPOCH, mode, uid, uid, "", ""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                out.addfile(info)
            else:
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def dirs(*names: str) -> list[tuple[str, str, bytes, int, int]]:
    return [(name, "dir", b"", 0o755, 0) for name in names]


def script(name: str) -> bytes:
    return f"#!/bin/sh\n# {name}: an example boot-time service\nexec sleep infinity\n".encode()


def root_tar() -> bytes:
    os_release = b'NAME="bootimg osbuild example"\nID=bootimg-example\nVERSION_ID=1.0\n'
    return tar(dirs("./", "etc", "usr", "usr/lib", "usr/lib/systemd", "var", "var/cache", "var/cache/example",
                    "var/lib", "var/lib/example")
               + [("etc/os-release", "file", os_release, 0o644, 0),
                  ("usr/lib/os-release", "file", os_release, 0o644, 0),
                  ("usr/lib/systemd/systemd", "file", ELF_HEADER, 0o755, 0),
                  ("var/cache/example/stale", "file", b"left out by the manifest\n", 0o644, 0),
                  ("var/lib/example/state", "file", b"the initial persistent /var\n", 0o640, 1000)])


def oci_archive(files: list[tuple[str, str, bytes, int, int]], ref: str, config: dict) -> bytes:
    """An OCI archive: a one-layer image layout in a plain tar."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    layer = tar(files)
    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    cfg = {"architecture": "amd64", "os": "linux", "config": config, "created": "2026-01-01T00:00:00Z",
           "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    cfg_desc = blob(json.dumps(cfg, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg_desc, "layers": [layer_desc]}
    man_desc = blob(json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    man_desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man_desc]}
    return tar(dirs("blobs", "blobs/sha256")
               + [(f"blobs/sha256/{d}", "file", data, 0o644, 0) for d, data in sorted(blobs.items())]
               + [("index.json", "file", json.dumps(index, sort_keys=True).encode(), 0o644, 0),
                  ("oci-layout", "file", b'{"imageLayoutVersion": "1.0.0"}', 0o644, 0)])


def key(name: str) -> SecretKey:
    """A development key derived from its name: the same key every time (never for a real system)."""
    return SecretKey.from_seed(hashlib.sha256(f"keynum {name}".encode()).digest()[:8],
                               hashlib.sha256(f"bootimg osbuild example {name}".encode()).digest(),
                               f"bootimg osbuild example {name} (development only)")


def inputs() -> dict[str, bytes]:
    """Every input of the example, by file name."""
    telemetry = oci_archive(dirs("usr", "usr/bin", "etc")
                            + [("usr/bin/telemetryd", "file", script("telemetry"), 0o755, 0),
                               ("etc/telemetry.toml", "file", b'endpoint = "https://telemetry.example.com"\n', 0o644, 0)],
                            "1.0", {"Entrypoint": ["/usr/bin/telemetryd"], "User": "1000:1000"})
    camera = tar(dirs("usr", "usr/bin") + [("usr/bin/rvc", "file", script("rear camera"), 0o755, 0)])
    k2026, k2027 = key("release-2026"), key("release-2027")
    placeholder = b"placeholder %s: the example's disk shows the layout; `bootimg initramfs` gives real ones\n"
    return {
        "root.tar": root_tar(),
        "telemetry.oci.tar": telemetry,
        "camera.tar": camera,
        "motd": b"bootimg osbuild example: a verified composefs root\n",
        "release-2026.key": k2026.to_bytes(),
        "release-2026.pub": k2026.public_key.to_bytes(),
        "release-2027.pub": k2027.public_key.to_bytes(),
        "vmlinuz": placeholder % b"kernel",
        "initrd.img": placeholder % b"initramfs",
    }


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bootimg_manifest(path: dict[str, str], root: dict) -> dict:
    """The bootimg manifest; ``path`` gives each input file's path or location, ``root`` the
    root's source."""
    return {
        "apiVersion": "bootimg/v1",
        "identity": {"name": "osbuild-example", "version": "1.0", "source_date_epoch": EPOCH},
        "rootfs": {
            "source": root,
            "exclude": ["/var/cache/**"],
            "add_files": [{"path": "/etc/hostname", "text": "osbuild-example\n"},
                          {"path": "/etc/motd", "source_path": path["motd"], "mode": "0644"}],
        },
        "containers": [
            {"name": "telemetry", "image": {"type": "oci", "path": path["telemetry.oci.tar"], "ref": "1.0"},
             "ordering": {"after": ["network-online.target"], "wants": ["network-online.target"]},
             "network": "host"},
            {"name": "rear-camera", "image": {"type": "tar", "path": path["camera.tar"]},
             "command": ["/usr/bin/rvc"], "phase": "early", "essential": "emergency"},
        ],
        "integrity": {"trust": "signed", "trusted_keys": [path["release-2026.pub"], path["release-2027.pub"]]},
        "boot": {"kernel_args": ["console=ttyS0,115200"]},
    }


def _files_input(*names: str, data: dict[str, bytes]) -> dict:
    return {"type": "org.osbuild.files", "origin": "org.osbuild.source",
            "references": {checksum(data[n]): {} for n in names}}


def _tree_input(pipeline: str) -> dict:
    return {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:{pipeline}"]}


def _loop(start: int, size: int) -> dict:
    return {"type": "org.osbuild.loopback",
            "options": {"filename": "disk.raw", "start": start // SECTOR, "size": size // SECTOR}}


def osbuild_manifest(data: dict[str, bytes] | None = None) -> dict:
    data = inputs() if data is None else data
    keys = {n: f"input://keys/{checksum(data[n])}" for n in ("release-2026.pub", "release-2027.pub")}
    locations = {"motd": "input://motd", "telemetry.oci.tar": "input://telemetry", "camera.tar": "input://camera",
                 **keys}
    release_stage = {
        "type": "org.bootimg.build",
        "inputs": {
            "os": _tree_input("os"),
            "telemetry": {"type": "org.osbuild.containers", "origin": "org.osbuild.pipeline",
                          "references": {"name:telemetry-image": {"name": "telemetry"}}},
            "camera": _files_input("camera.tar", data=data),
            "keys": _files_input("release-2026.pub", "release-2027.pub", data=data),
            "motd": _files_input("motd", data=data),
            "signing-key": _files_input("release-2026.key", data=data),
        },
        "options": {
            "manifest": bootimg_manifest(locations, {"type": "directory", "path": "input://os"}),
            "output": {"repository": "/composefs"},
            "boot-check": False,
        },
    }
    esp, data_part = _loop(ESP_START, ESP_SIZE), _loop(DATA_START, DATA_SIZE)
    image_stages = [
        {"type": "org.osbuild.truncate", "options": {"filename": "disk.raw", "size": str(DISK_SIZE)}},
        {"type": "org.osbuild.sfdisk",
         "options": {"label": "gpt", "uuid": DISK_UUID, "partitions": [
             {"start": ESP_START // SECTOR, "size": ESP_SIZE // SECTOR, "type": ESP_TYPE, "uuid": ESP_UUID,
              "name": "esp"},
             {"start": DATA_START // SECTOR, "size": DATA_SIZE // SECTOR, "type": X86_64.root_type,
              "uuid": DATA_UUID, "name": DATA_LABEL}]},
         "devices": {"device": {"type": "org.osbuild.loopback", "options": {"filename": "disk.raw"}}}},
        {"type": "org.osbuild.write-device", "inputs": {"tree": _tree_input("disk-tree")},
         "options": {"from": "input://tree/esp.img"}, "devices": {"device": esp}},
        {"type": "org.osbuild.mkfs.ext4", "options": {"uuid": seeded_uuid("data-fs"), "label": DATA_LABEL,
                                                      "verity": True},
         "devices": {"device": data_part}},
        {"type": "org.osbuild.copy", "inputs": {"tree": _tree_input("disk-tree")},
         "options": {"paths": [{"from": "input://tree/data/", "to": "mount://data/"}]},
         "devices": {"data": data_part},
         "mounts": [{"name": "data", "type": "org.osbuild.ext4", "source": "data", "target": "/"}]},
    ]
    pipelines = [
        {"name": "os", "stages": [{"type": "org.osbuild.untar",
                                   "inputs": {"file": _files_input("root.tar", data=data)}}]},
        {"name": "telemetry-image", "stages": [{
            "type": "org.osbuild.copy",
            "inputs": {"archive": _files_input("telemetry.oci.tar", data=data)},
            "options": {"paths": [{"from": f"input://archive/{checksum(data['telemetry.oci.tar'])}",
                                   "to": "tree:///telemetry.oci.tar"}]}}]},
        {"name": "release", "stages": [release_stage]},
        {"name": "disk-tree", "stages": [{
            "type": "org.bootimg.disk-tree",
            "inputs": {"release": _tree_input("release"), "kernel": _files_input("vmlinuz", data=data),
                       "initrd": _files_input("initrd.img", data=data)},
            "options": {"release": "input://release/composefs", "kernel": "input://kernel",
                        "initrd": "input://initrd", "data-partuuid": DATA_UUID, "esp-size": ESP_SIZE}}]},
        {"name": "image", "stages": image_stages},
    ]
    for p in pipelines:
        p["source-epoch"] = EPOCH
    items = {checksum(v): {"encoding": "base64", "data": base64.b64encode(v).decode()}
             for _, v in sorted(data.items())}
    return {"version": "2", "pipelines": pipelines, "sources": {"org.osbuild.inline": {"items": items}}}


def render() -> str:
    return json.dumps(osbuild_manifest(), indent=2, sort_keys=True) + "\n"


def write_inputs(dest: Path) -> Path:
    """The inputs as files in ``dest``, and ``dest/bootimg.yaml``: the release pipeline's
    manifest for `bootimg build`, the root as the tarball itself. Returns the YAML's path."""
    dest.mkdir(parents=True, exist_ok=True)
    data = inputs()
    for name, content in data.items():
        (dest / name).write_bytes(content)
    manifest = bootimg_manifest({n: n for n in data}, {"type": "tar", "path": "root.tar"})
    out = dest / "bootimg.yaml"
    out.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", metavar="DIR", help="write the inputs and bootimg.yaml here instead")
    args = parser.parse_args()
    if args.inputs:
        print(write_inputs(Path(args.inputs)))
    else:
        MANIFEST.write_text(render())
        print(MANIFEST)
    sys.exit(0)
