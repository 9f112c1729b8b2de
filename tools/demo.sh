#!/bin/sh
# `make demo`: the main job, end to end on this machine: the example system's manifest is
# validated and built into a signed release (composefs images + one shared object store),
# the release is verified, and its root image is mounted the way the initramfs mounts it
# (EROFS + overlayfs with the store as a data-only layer) and shown.
set -eu
cd "$(dirname "$0")/.."
BOOTIMG=".venv/bin/bootimg"
WORK=${DEMO_WORK:-/var/tmp/bootimg-demo}
OUT="$WORK/release"

rm -rf "$WORK"
mkdir -p "$WORK/meta" "$WORK/root"
cleanup() {
    umount "$WORK/root" 2>/dev/null || true
    umount "$WORK/meta" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== inputs: rootfs, four container images (OCI, tar.zst, directory), dev keys -> build/"
.venv/bin/python tools/example_inputs.py

echo "== bootimg validate manifests/ivi-demo.yaml"
$BOOTIMG validate manifests/ivi-demo.yaml

echo "== bootimg validate manifests/broken.yaml (a deliberately broken one: every error at once)"
$BOOTIMG validate manifests/broken.yaml || true

echo "== bootimg build manifests/ivi-demo.yaml -o $OUT --key build/keys/release-2026.key"
$BOOTIMG build manifests/ivi-demo.yaml -o "$OUT" --key build/keys/release-2026.key

echo "== bootimg verify $OUT --key build/keys/release-2026.pub"
$BOOTIMG verify "$OUT" --key build/keys/release-2026.pub

echo "== the root image, mounted as the initramfs will mount it"
if [ "$(id -u)" = 0 ]; then
    mount -t erofs -o loop,ro "$OUT/images/root.cfs" "$WORK/meta"
    mount -t overlay composefs -o "ro,metacopy=on,redirect_dir=on,lowerdir=$WORK/meta::$OUT/objects" "$WORK/root"
    grep " $WORK/root " /proc/mounts
    ls -la "$WORK/root" "$WORK/root/usr/lib/bootimg" "$WORK/root/usr/lib/bootimg/keys"
    echo "-- /usr/lib/bootimg/containers.json (inside the root image, covered by its digest):"
    cat "$WORK/root/usr/lib/bootimg/containers.json"
    echo "-- /etc/hostname: $(cat "$WORK/root/etc/hostname")"
else
    echo "(not root: skipping the kernel mount)"
fi
echo "== release.json"
cat "$OUT/release.json"

echo "== the example system on the QEMU board (manifests/board.yaml): a Debian root as a signed"
echo "   release, its initramfs hook, a provisioned disk; boot it from the verified composefs root"
if [ "$(id -u)" = 0 ]; then
    $BOOTIMG board system manifests/board.yaml --key build/keys/release-2026.key \
        --serial-log "$WORK/board-console.log"
else
    echo "(not root: skipping the board)"
fi

echo "== boot KPIs of the example system: 3 boots on the board, judged against manifests/board.yaml"
if [ "$(id -u)" = 0 ]; then
    # exit 1 = a KPI failed (the report says which): shown, not fatal for the demo
    $BOOTIMG kpi run --manifest manifests/board.yaml --times 3 \
        --board-system build/board/release.system.json -o build/kpi || [ $? -eq 1 ]
    cat build/kpi/kpi.md
    echo "(HTML report: build/kpi/kpi.html, JUnit: build/kpi/kpi.junit.xml)"
fi
