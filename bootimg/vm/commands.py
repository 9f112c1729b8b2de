"""`bootimg qemu`: boot a disk under QEMU, like `mkosi qemu`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ..errors import BootimgError


def add_machine_arguments(p: argparse.ArgumentParser) -> None:
    """The options that describe the machine a disk boots in (``bootimg qemu``, ``kpi run``)."""
    g = p.add_argument_group("machine")
    g.add_argument("--disk-format", choices=("raw", "qcow2"), help="the disk's format (default: from its name)")
    g.add_argument("--arch", help="the machine's architecture: amd64, arm64 (default: the root partition type of a "
                                  "raw disk made by `bootimg disk`, else amd64)")
    g.add_argument("--memory", type=int, default=2048, metavar="MiB", help="memory (default 2048)")
    g.add_argument("--smp", type=int, default=2, metavar="N", help="CPUs (default 2)")
    g.add_argument("--kvm", action="store_true", help="use KVM when /dev/kvm works (default: TCG)")
    g.add_argument("--efi-vars", metavar="FILE", help="keep the UEFI variables in FILE (default: fresh per boot)")
    g.add_argument("--kernel", metavar="FILE", help="boot this kernel directly (no firmware, no loader)")
    g.add_argument("--initrd", metavar="FILE", help="with --kernel: the initramfs")
    g.add_argument("--append", metavar="CMDLINE", default="", help="with --kernel: the kernel command line")


def disk_arch(disk: Path, fmt: str):
    """The architecture a raw disk is for, from its GPT: the Discoverable Partitions root type
    ``bootimg disk`` gives the data partition. None when it does not say (qcow2, no GPT)."""
    import shutil
    import subprocess

    from .. import arch

    if fmt != "raw" or shutil.which("sfdisk") is None:
        return None
    proc = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        parts = json.loads(proc.stdout)["partitiontable"].get("partitions", [])
        types = {str(p.get("type", "")).lower() for p in parts}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return next((a for a in arch.ARCHES.values() if a.root_type in types), None)


def machine_of(args: argparse.Namespace, *, snapshot: bool = True):
    from .. import arch
    from .qemu import Machine

    disk = Path(args.disk)
    if not disk.is_file():
        raise BootimgError("disk not found", file=str(disk))
    fmt = args.disk_format or ("qcow2" if disk.suffix == ".qcow2" else "raw")
    if (args.initrd or args.append) and not args.kernel:
        raise BootimgError("--initrd and --append go with --kernel (a direct kernel boot)")
    return Machine(disk=disk, disk_format=fmt, kernel=Path(args.kernel) if args.kernel else None,
                   initrd=Path(args.initrd) if args.initrd else None, append=args.append,
                   arch=arch.by_name(args.arch) if args.arch else (disk_arch(disk, fmt) or arch.X86_64),
                   efi_vars=Path(args.efi_vars) if args.efi_vars else None,
                   memory=args.memory, smp=args.smp, kvm=args.kvm, snapshot=snapshot)


def _cmd_qemu(args: argparse.Namespace) -> int:
    from .qemu import qemu_argv
    from .session import free_port, running

    machine = machine_of(args, snapshot=args.snapshot)
    if args.run is None and not args.wait:
        # Interactive: QEMU owns the terminal (serial console + monitor on stdio, Ctrl-a x quits).
        port = args.ssh_port or free_port()
        m = machine.with_(extra_args=("-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"))
        efi_vars = m.efi_vars
        if m.uefi and efi_vars is None:
            import shutil
            import tempfile

            from .qemu import firmware

            efi_vars = Path(tempfile.mkdtemp(prefix="bootimg-qemu-")) / "efivars.fd"
            shutil.copyfile(firmware(m.arch)[1], efi_vars)
        argv = qemu_argv(m, efi_vars=efi_vars)
        i = argv.index("-serial")
        log = f",logfile={args.console_log}" if args.console_log else ""
        argv[i:i + 2] = ["-chardev", f"stdio,id=con,mux=on,signal=off{log}", "-serial", "chardev:con",
                         "-mon", "chardev=con,mode=readline"]
        print(f"bootimg qemu: ssh -p {port} root@127.0.0.1 reaches the guest; Ctrl-a x quits", file=sys.stderr)
        os.execvp(argv[0], argv)
    with running(machine, timeout=args.timeout, serial_log=args.console_log) as vm:
        result = vm.result
        out = {"ok": result.ok, "reason": result.exit_reason, "stage": result.stage,
               "seconds_to_ready": round(result.duration, 2) if result.ok else None}
        rc = 0 if result.ok else 1
        if result.ok and args.run:
            proc = vm.run("sh", "-c", shlex.quote(args.run), check=False, timeout=args.timeout)
            out["run"] = {"command": args.run, "exit_status": proc.returncode, "stdout": proc.stdout,
                          "stderr": proc.stderr}
            rc = proc.returncode
    if args.json:
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        if result.ok:
            print(f"{args.disk}: up (ssh answered) after {result.duration:.1f} s", file=sys.stderr)
        else:
            print(f"bootimg qemu: {args.disk}: {result.summary()}", file=sys.stderr)
        if "run" in out:
            sys.stdout.write(out["run"]["stdout"])
            sys.stderr.write(out["run"]["stderr"])
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qemu", help="boot a disk under QEMU (UEFI firmware, the disk's systemd-boot)",
                       description="Boot a disk made by `bootimg disk` under QEMU with UEFI firmware (OVMF; "
                                   "AAVMF for arm64), ssh forwarded to a local port. Without --wait or --run the "
                                   "serial console is this terminal; with them bootimg waits until the guest's "
                                   "sshd answers (the system must take bootimg's vm ssh key), runs the command "
                                   "and powers it off.")
    p.add_argument("disk", metavar="DISK")
    add_machine_arguments(p)
    p.add_argument("--snapshot", action="store_true", help="throw the guest's writes away")
    p.add_argument("--console-log", metavar="FILE", help="also write the serial console to FILE")
    p.add_argument("--ssh-port", type=int, metavar="N", help="the local port forwarded to the guest's ssh")
    p.add_argument("--wait", action="store_true", help="boot until ssh answers, then power off; exit 0 if it did")
    p.add_argument("--run", metavar="COMMAND", help="once up, run COMMAND in the guest (sh -c) and power off")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="with --wait/--run (default 600)")
    p.add_argument("--json", action="store_true", help="with --wait/--run: print the result as JSON")
    p.set_defaults(func=_cmd_qemu)
