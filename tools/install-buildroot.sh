#!/bin/sh
# bootimg in the host's system Python (/usr/bin/python3): what bootimg's osbuild stages import
# when the host is osbuild's build root (a pipeline without a "build" pipeline; the sandbox
# sees the host's /usr). The dependencies are the distribution's own packages (tools/setup-host.sh
# installs Debian's); bootimg itself goes to /usr/local with pip --no-deps, so pip never
# replaces a distribution package. Idempotent: reinstalls only when the sources changed (their
# hash is kept next to the installed package). Needs root.
set -eu
cd "$(dirname "$0")/.."
SYSPY=${SYSTEM_PYTHON:-/usr/bin/python3}

sources() {  # what the installed package is made of, in a stable order
    find pyproject.toml README.md bootimg -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort
}
want=$(sources | xargs sha256sum | sha256sum | cut -d' ' -f1)
have=$("$SYSPY" -I -c 'import bootimg, os; print(open(os.path.join(os.path.dirname(bootimg.__file__), ".source-sha256")).read().strip())' 2>/dev/null || true)
[ "$have" = "$want" ] && exit 0

echo "setup: installing bootimg into $SYSPY (/usr/local, for osbuild's host build root)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Build from a clean copy: pip builds in the source directory, and build/ is the project's.
sources | tar -cf - -T - | tar -xf - -C "$tmp"
"$SYSPY" -m pip install --quiet --no-deps --break-system-packages --root-user-action=ignore \
    --no-warn-script-location "$tmp" >/dev/null
dir=$("$SYSPY" -I -c 'import bootimg, os; print(os.path.dirname(bootimg.__file__))')
case "$dir" in
    /usr/local/*) ;;
    *) echo "setup: $SYSPY imports bootimg from $dir, not from /usr/local" >&2; exit 1 ;;
esac
echo "$want" > "$dir/.source-sha256"
