#!/usr/bin/env python3
"""Make the inputs the example manifests point at, under build/ (deterministically).

- build/ivi-rootfs/               the root filesystem (a directory source)
- build/images/vehicle-bus/       an OCI image layout, ref "1.4.0", two layers
- build/images/cluster/           an OCI image layout, ref "latest", three layers with whiteouts
- build/images/rear-camera.tar.zst a zstd tar
- build/images/telemetry/         a directory
- build/minimal-rootfs.tar        a plain tar (manifests/minimal.yaml)
- build/keys/release-2026.{key,pub}, release-2027.{key,pub}   release signing keys (dev only)

The programs are small POSIX sh services built from the host's own shell and libc, so the
images share real objects (libc, ld.so, sh) the way real containers share a runtime. On the
QEMU board (issue 4) the rootfs comes from debootstrap instead; these stay the container
images. Run: .venv/bin/python tools/example_inputs.py [BUILD_DIR]

With ``--arch arm64`` only the four container images are made, for an arm64 system
(manifests/board-arm64.yaml), in build/images-arm64/: their shell, libc and ld.so come from an
arm64 root (``--sysroot``, default build/board-arm64/rootfs, what ``bootimg board rootfs --arch
arm64`` extracts) and demo-wait is cross-compiled (aarch64-linux-gnu-gcc, static).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

EPOCH = 1767225600
RUNTIME = {  # architecture -> [(path in the runtime's root, path in image)]: the shared runtime
    "amd64": [("bin/dash", "usr/bin/sh"),
              ("lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
              ("lib64/ld-linux-x86-64.so.2", "usr/lib64/ld-linux-x86-64.so.2")],
    "arm64": [("usr/bin/dash", "usr/bin/sh"),
              ("usr/lib/aarch64-linux-gnu/libc.so.6", "usr/lib/aarch64-linux-gnu/libc.so.6"),
              ("usr/lib/ld-linux-aarch64.so.1", "usr/lib/ld-linux-aarch64.so.1")],
}


# usr-merged layout: the programs' interpreter is /lib64/ld-linux-x86-64.so.2 (arm64:
# /lib/ld-linux-aarch64.so.1).
USR_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64"}
DEMO_WAIT_C = Path(__file__).resolve().parent / "demo-wait" / "demo-wait.c"


def demo_wait(build: Path, arch: str = "amd64") -> bytes:
    """tools/demo-wait/demo-wait.c built static (sd_notify READY=1, then wait): rebuilt only when
    the source changes; gcc's output is deterministic for the same compiler and source. Another
    architecture than the host's is cross-compiled (Debian's gcc-aarch64-linux-gnu)."""
    from bootimg import arch as archmod

    target = archmod.by_name(arch)
    src = DEMO_WAIT_C.read_bytes()
    tag = "" if target.native else f"{target.name}-"
    out = build / "demo-wait" / f"demo-wait-{tag}{hashlib.sha256(src).hexdigest()[:16]}"
    if not out.is_file():
        cc = "gcc" if target.native else target.cc
        if shutil.which(cc) is None:
            sys.exit(f"example_inputs: {cc} not found: install {target.cc_package} (sh tools/setup-host.sh)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run([cc, "-static", "-O2", "-s", "-o", str(tmp), str(DEMO_WAIT_C)], check=True)
        os.replace(tmp, out)
    return out.read_bytes()


def read_in(root: Path, rel: str) -> bytes:
    """The file at ``rel`` of the tree ``root``, its symlinks resolved inside ``root`` (an
    absolute target is relative to ``root``, never the host's)."""
    parts, where, hops = [p for p in rel.split("/") if p], [], 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            where = where[:-1]
            continue
        path = root.joinpath(*where, name)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                sys.exit(f"example_inputs: {root}/{rel}: too many symlinks")
            target = os.readlink(path)
            if target.startswith("/"):
                where = []
            parts = [p for p in target.split("/") if p] + parts
        else:
            where.append(name)
    path = root.joinpath(*where)
    if not path.is_file():
        sys.exit(f"example_inputs: {root}/{rel}: not found (a {rel.split('/')[-1]} of the runtime)")
    return path.read_bytes()


def service_script(name: str, notify: bool) -> bytes:
    flag = " --notify" if notify else ""
    return (f"#!/usr/bin/sh\n# {name}: demo boot-time service\necho \"{name}: started\"\n"
            f"exec /usr/bin/demo-wait{flag} {name}\n").encode()


def runtime_files(build: Path, arch: str = "amd64", sysroot: Path = Path("/")) -> dict[str, tuple[bytes, int]]:
    files = {}
    for src, inside in RUNTIME[arch]:
        files[inside] = (read_in(sysroot, src), 0o755)
    files["usr/bin/demo-wait"] = (demo_wait(build, arch), 0o755)
    files["etc/os-release"] = (b'NAME="bootimg demo"\nID=bootimg-demo\nVERSION_ID=1.4.0\n', 0o644)
    return files


def write_dir(top: Path, files: dict[str, tuple[bytes, int]], symlinks: dict[str, str] | None = None) -> None:
    for rel, (data, mode) in sorted(files.items()):
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
    for rel, target in sorted((symlinks or {}).items()):
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(top, (EPOCH, EPOCH))


def tar_bytes(files: dict[str, tuple[bytes, int]], symlinks: dict[str, str] | None = None,
              whiteouts: list[str] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for rel in list(files) + list(symlinks or {}) + list(whiteouts):
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        entries = [(d, "dir") for d in dirs] + [(f, "file") for f in files] + \
                  [(s, "sym") for s in (symlinks or {})] + [(w, "wh") for w in whiteouts]
        for rel, kind in sorted(entries):
            info = tarfile.TarInfo(rel)
            info.mtime = EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, symlinks[rel], 0o777
                tar.addfile(info)
            else:
                data, mode = files[rel] if kind == "file" else (b"", 0o644)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=10).compress(data)


def write_oci(top: Path, layers: list[tuple[bytes, str]], ref: str, config: dict, arch: str = "amd64") -> None:
    """An OCI image layout with one manifest; layers are (tar bytes, 'tar'|'gzip'|'zstd')."""
    blobs = top / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_descs, diff_ids = [], []
    for data, comp in layers:
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        if comp == "gzip":
            payload, media = gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif comp == "zstd":
            payload, media = zstd(data), "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            payload, media = data, "application/vnd.oci.image.layer.v1.tar"
        layer_descs.append({"mediaType": media, **blob(payload)})
    cfg = {"architecture": arch, "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": diff_ids}, "created": "2026-01-01T00:00:00Z"}
    cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                **blob(json.dumps(cfg, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg_desc, "layers": layer_descs}
    man_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(json.dumps(manifest, sort_keys=True).encode()),
                "annotations": {"org.opencontainers.image.ref.name": ref}}
    (top / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (top / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man_desc]}, sort_keys=True))


def make_keys(keys: Path) -> None:
    from bootimg.signing import generate_keypair

    keys.mkdir(parents=True, exist_ok=True)
    for name in ("release-2026", "release-2027"):
        if (keys / f"{name}.key").exists():
            continue
        secret, public = generate_keypair(f"bootimg demo {name} (development only)")
        secret.to_file(keys / f"{name}.key")
        public.to_file(keys / f"{name}.pub")


def write_images(images: Path, runtime: dict[str, tuple[bytes, int]], arch: str = "amd64") -> None:
    """The four containers of the example systems."""
    images.mkdir(parents=True)
    # vehicle-bus: OCI, base runtime layer (gzip) + app layer (plain).
    app = {"usr/bin/vbusd": (service_script("vehicle-bus", True), 0o755)}
    write_oci(images / "vehicle-bus", [(tar_bytes(runtime, USR_LINKS), "gzip"), (tar_bytes(app), "tar")],
              "1.4.0", {"Entrypoint": ["/usr/bin/vbusd"], "Env": ["PATH=/usr/bin"], "User": "1100:1100"}, arch)
    # cluster: OCI with a whiteout of a base file and an opaque directory (zstd layers).
    base = dict(runtime)
    base["usr/share/cluster/theme/old.css"] = (b"body{}\n" * 20, 0o644)
    base["usr/share/cluster/legacy.txt"] = (b"legacy\n" * 20, 0o644)
    upper = {"usr/bin/clusterd": (service_script("cluster", True), 0o755),
             "usr/share/cluster/theme/.wh..wh..opq": (b"", 0o644),
             "usr/share/cluster/theme/new.css": (b"body{color:#fff}\n" * 20, 0o644)}
    write_oci(images / "cluster", [(tar_bytes(base, USR_LINKS), "zstd"),
                                   (tar_bytes(upper, whiteouts=["usr/share/cluster/.wh.legacy.txt"]), "zstd")],
              "latest", {"Cmd": ["/usr/bin/clusterd"], "Env": ["PATH=/usr/bin"]}, arch)
    # rear-camera: a zstd tar.
    cam = dict(runtime)
    cam["usr/bin/rvc"] = (service_script("rear-camera", True), 0o755)
    (images / "rear-camera.tar.zst").write_bytes(zstd(tar_bytes(cam, USR_LINKS)))
    # telemetry: a directory.
    tel = dict(runtime)
    tel["usr/bin/telemetryd"] = (service_script("telemetry", False), 0o755)
    tel["etc/telemetry.toml"] = (b'endpoint = "https://telemetry.example.com/v1"\nbatch = 64\n', 0o644)
    write_dir(images / "telemetry", tel, USR_LINKS)


def main(build: Path, arch: str = "amd64", sysroot: Path | None = None) -> None:
    if arch != "amd64":
        # Another architecture's containers (its runtime from a root of that architecture).
        if arch not in RUNTIME:
            sys.exit(f"example_inputs: no runtime for architecture {arch!r} (have: {', '.join(RUNTIME)})")
        images = build / f"images-{arch}"
        shutil.rmtree(images, ignore_errors=True)
        write_images(images, runtime_files(build, arch, sysroot or build / f"board-{arch}" / "rootfs"), arch)
        make_keys(build / "keys")
        return
    images = build / "images"
    for path in (build / "ivi-rootfs", images):
        shutil.rmtree(path, ignore_errors=True)
    runtime = runtime_files(build, arch, sysroot or Path("/"))
    # Root filesystem: the runtime plus the system's own files.
    root_files = dict(runtime)
    root_files["etc/motd"] = (b"bootimg demo: verified composefs root\n", 0o644)
    root_files["usr/lib/bootimg-demo/banner.txt"] = (b"IVI demo\n" * 40, 0o644)
    root_files["var/cache/demo/stale.bin"] = (b"x" * 1000, 0o644)        # excluded by the manifest
    write_dir(build / "ivi-rootfs", root_files, USR_LINKS)
    write_images(images, runtime, arch)
    # minimal.yaml: the root as a plain tar.
    (build / "minimal-rootfs.tar").write_bytes(tar_bytes(root_files, USR_LINKS))
    make_keys(build / "keys")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Make the inputs the example manifests point at.")
    parser.add_argument("build", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent / "build")
    parser.add_argument("--arch", default="amd64", choices=sorted(RUNTIME),
                        help="the containers' architecture (arm64: the containers only, in BUILD/images-arm64)")
    parser.add_argument("--sysroot", type=Path, help="the root the runtime (sh, libc, ld.so) is taken from "
                                                     "(default: / for amd64, BUILD/board-ARCH/rootfs otherwise)")
    args = parser.parse_args()
    main(args.build, args.arch, args.sysroot)
