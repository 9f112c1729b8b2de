#!/bin/sh
# `make demo`: build a composefs image of a real tree with bootimg, mount it the way the
# initramfs will (EROFS + overlayfs, the object store as a data-only layer), and show it.
set -eu
cd "$(dirname "$0")/.."
SRC=${DEMO_SRC:-/usr}
WORK=${DEMO_WORK:-/var/tmp/bootimg-demo}
BOOTIMG=".venv/bin/bootimg"

rm -rf "$WORK"
mkdir -p "$WORK/erofs" "$WORK/mnt"
cleanup() {
    umount "$WORK/mnt" 2>/dev/null || true
    umount "$WORK/erofs" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== building a composefs image of $SRC (objects into $WORK/store)"
start=$(date +%s%N)
digest=$($BOOTIMG mkcomposefs --print-digest --digest-store="$WORK/store" "$SRC" "$WORK/image.cfs")
end=$(date +%s%N)
echo "image:   $WORK/image.cfs ($(stat -c %s "$WORK/image.cfs") bytes) in $(( (end - start) / 1000000 )) ms"
echo "digest:  $digest   (fs-verity of the image; kernel arg: composefs.digest=$digest)"
echo "objects: $(find "$WORK/store" -type f | wc -l) in the store, $(du -sh "$WORK/store" | cut -f1)"
echo "fsck.erofs: $(fsck.erofs "$WORK/image.cfs" >/dev/null 2>&1 && echo OK || echo FAILED)"

if [ "$(id -u)" = 0 ]; then
    echo "== mounting: EROFS (loop) + overlayfs lowerdir=IMAGE::STORE"
    mount -t erofs -o loop,ro "$WORK/image.cfs" "$WORK/erofs"
    mount -t overlay composefs -o "ro,metacopy=on,redirect_dir=on,lowerdir=$WORK/erofs::$WORK/store" "$WORK/mnt"
    grep " $WORK/mnt " /proc/mounts
    ls -la "$WORK/mnt" | head -15
    n_src=$(find "$SRC" -xdev | wc -l)
    n_mnt=$(find "$WORK/mnt" | wc -l)
    echo "entries: source $n_src, mounted $n_mnt"
    if diff -r --no-dereference "$SRC" "$WORK/mnt" >/dev/null 2>&1; then
        echo "content: every file of $SRC reads identically through the composefs mount"
    else
        echo "content: DIFFERS (diff -r $SRC $WORK/mnt)"; exit 1
    fi
    echo "== composefs-info ls (first lines)"
    $BOOTIMG composefs-info ls "$WORK/image.cfs" | head -8
else
    echo "(not root: skipping the kernel mount)"
fi
