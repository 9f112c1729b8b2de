"""`bootimg install/gc/status` run on a device with only Debian's python3 and
python3-cryptography: their import path must not need bootimg's other dependencies."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

BLOCKED = ("yaml", "jsonschema", "xxhash", "zstandard", "pystemd")


def test_the_device_commands_import_without_the_build_dependencies():
    code = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None\n"
            "from bootimg.cli import build_parser\n"
            "for cmd in ('install', 'gc', 'status'):\n"
            "    build_parser(cmd).parse_args([cmd, '--help'] if False else [cmd] + (['x'] if cmd == 'install' else []))\n"
            "import bootimg.device.install, bootimg.device.gc, bootimg.device.status\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
