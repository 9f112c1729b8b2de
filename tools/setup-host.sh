#!/bin/sh
# Idempotent host set-up for bootimg's tests and demo: Debian packages, then a venv at .venv
# with bootimg installed editable. Safe to run again; does nothing that is already done.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="erofs-utils fsverity attr util-linux e2fsprogs minisign signify-openbsd openssl"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
# Reinstall only when the project's metadata changed.
stamp=.venv/.bootimg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: pip install -e .[test]"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi
