#!/bin/sh
# `make demo`: the main job, end to end on this machine: the example system's manifest is
# validated and built into a signed release (composefs images + one shared object store),
# the release is verified, and its root image is mounted the way the initramfs mounts it
# (`bootimg mount`: EROFS + overlayfs with the store as a data-only layer) and shown.
set -eu
cd "$(dirname "$0")/.."
BOOTIMG=".venv/bin/bootimg"
WORK=${DEMO_WORK:-/var/tmp/bootimg-demo}
OUT="$WORK/release"

if [ "$(id -u)" = 0 ] && [ -d "$WORK/root" ]; then
    $BOOTIMG umount "$WORK/root" 2>/dev/null || true
fi
rm -rf "$WORK"
mkdir -p "$WORK/root"
cleanup() {
    if [ "$(id -u)" = 0 ]; then
        $BOOTIMG umount "$WORK/root" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

echo "== inputs: rootfs, four container images (OCI, tar.zst, directory), dev keys -> build/"
.venv/bin/python tools/example_inputs.py

echo "== bootimg validate manifests/ivi-demo.yaml"
$BOOTIMG validate manifests/ivi-demo.yaml

echo "== bootimg validate manifests/broken.yaml (a deliberately broken one: every error at once)"
$BOOTIMG validate manifests/broken.yaml || true

echo "== bootimg build manifests/ivi-demo.yaml (its root, made by tools/example_inputs.py, has no kernel,"
echo "   systemd or dracut: the boot check refuses it, every missing piece on its own line)"
$BOOTIMG build manifests/ivi-demo.yaml -o "$OUT" --key build/keys/release-2026.key || true
echo "== bootimg build manifests/ivi-demo.yaml -o $OUT --key build/keys/release-2026.key --no-boot-check"
$BOOTIMG build manifests/ivi-demo.yaml -o "$OUT" --key build/keys/release-2026.key --no-boot-check

echo "== bootimg verify $OUT --key build/keys/release-2026.pub"
$BOOTIMG verify "$OUT" --key build/keys/release-2026.pub

echo "== the root image, mounted as the initramfs will mount it"
if [ "$(id -u)" = 0 ]; then
    # verity=require first; a build host whose filesystem has no fs-verity is refused (one line
    # saying so), and --no-verity mounts it without runtime verification.
    $BOOTIMG mount "$OUT" "$WORK/root" || $BOOTIMG mount --no-verity "$OUT" "$WORK/root"
    grep " $WORK/root " /proc/mounts
    ls -la "$WORK/root" "$WORK/root/usr/lib/bootimg" "$WORK/root/usr/lib/bootimg/keys"
    echo "-- /usr/lib/bootimg/containers.json (inside the root image, covered by its digest):"
    cat "$WORK/root/usr/lib/bootimg/containers.json"
    echo "-- /etc/hostname: $(cat "$WORK/root/etc/hostname")"
    $BOOTIMG umount "$WORK/root"
else
    echo "(not root: skipping the kernel mount)"
fi
echo "== release.json"
cat "$OUT/release.json"

echo "== the example system (manifests/board.yaml: the four containers on a Debian root) through the"
echo "   general path: build -> disk -> qemu -> kpi run"
if [ "$(id -u)" = 0 ]; then
    $BOOTIMG board rootfs                                  # the test rig's Debian root, where board.yaml reads it
    $BOOTIMG build manifests/board.yaml -o build/board/release --force --key build/keys/release-2026.key
    $BOOTIMG disk build/board/release -o build/board/disk.raw --force   # GPT: ESP (systemd-boot) + data
    # The first boot provisions the disk (fs-verity on every image and object), so keep its writes;
    # then show what was booted: the verified root digest and the containers.
    $BOOTIMG qemu build/board/disk.raw --console-log "$WORK/board-console.log" --run \
        'cat /run/bootimg/booted.json; findmnt -no FSTYPE,OPTIONS /; systemctl is-system-running --wait;
         systemctl list-units --no-legend vehicle-bus.service rear-camera.service cluster.service telemetry.service'

    echo "== boot KPIs of the example system: 3 UEFI boots of the disk, judged against manifests/board.yaml"
    # exit 1 = a KPI failed (the report says which): shown, not fatal for the demo
    $BOOTIMG kpi run --manifest manifests/board.yaml --times 3 --disk build/board/disk.raw -o build/kpi \
        || [ $? -eq 1 ]
    cat build/kpi/kpi.md
    echo "(HTML report: build/kpi/kpi.html, JUnit: build/kpi/kpi.junit.xml)"
else
    echo "(not root: skipping the board)"
fi
