"""``pyrovm qemu ARGS...`` / ``pyrovm-qemu-system-x86_64 ARGS...``: run what QEMU's command line asks for.

Exit statuses are ``pyrovm run``'s, which agree with QEMU's where scripts rely on them: the guest's
``isa-debug-exit`` write V gives ``(V << 1) | 1``, and a guest reset ends the process with 0 (as QEMU
with ``-no-reboot``; without it QEMU would reboot the guest, pyrovm cannot, and says so).  A command line
pyrovm does not take is one line on stderr and status 2: QEMU's own usage errors exit with 1, but pyrovm
keeps one status for every kind of bad input (``pyrovm run``'s 2), so that a script can tell "pyrovm
cannot do this" (2) from the guest's exit-port value 0 (1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

START = time.monotonic()

USAGE = """\
usage: pyrovm qemu [QEMU OPTIONS...]   (also installed as pyrovm-qemu-system-x86_64)

Runs a VM from a qemu-system-x86_64 -enable-kvm command line. Taken: -enable-kvm, -accel kvm,
-machine/-M q35|pc|microvm[,accel=kvm], -m SIZE, -smp N|cpus=,sockets=,cores=,threads=,
-cpu host|qemu64|...[,kvm=off][,+FEAT][,-FEAT], -kernel, -initrd, -append,
-drive file=,if=virtio|none,format=raw[,readonly=on][,id=][,cache=],
-device virtio-blk-*|virtio-net-*|vhost-vsock-*|virtio-rng-*|isa-debug-exit,
-netdev user[,hostfwd=...]|tap,ifname=,script=no,downscript=no, -nographic, -display none,
-serial stdio|mon:stdio|file:PATH|null, -monitor none, -no-reboot, -name, -pidfile, -daemonize,
-object rng-random|rng-builtin, -qmp unix:PATH,server,wait=off, -sandbox on|off (pyrovm's seccomp
filters, on by default), -nodefaults, -no-user-config.
Anything else: one line naming the option and pyrovm's nearest equivalent, status 2.
See README ("QEMU's command line") for the table.
"""


def _fail(message: str) -> int:
    print(f"pyrovm qemu: {message}", file=sys.stderr)
    return 2


def _daemonize() -> None:
    """Detach as QEMU's -daemonize does: the parent exits 0 once the child runs."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import PyrovmError
    from ..kvm import KvmError
    from ..runner import SignalWorker, run_vm
    from ..vmm import VM
    from .qmp import QmpServer
    from .translate import translate

    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"], ["-help"]):
        print(USAGE, end="")
        return 0
    if args in (["-version"], ["--version"]):
        from .. import __version__

        print(f"QEMU emulator version 7.2.0 (pyrovm {__version__}: pyrovm qemu)")
        return 0
    try:
        setup = translate(args)
    except PyrovmError as exc:
        return _fail(str(exc))
    if setup.daemonize and setup.config.console == "stdio":
        return _fail("-daemonize: the console cannot be stdio (-serial file:PATH or null)")
    for notice in setup.notices:
        print(f"pyrovm qemu: {notice}", file=sys.stderr)
    if not setup.no_reboot:
        print("pyrovm qemu: a guest reset ends the VM (as with -no-reboot): pyrovm does not reboot guests",
              file=sys.stderr)  # fmt: skip
    if setup.config.vsock is not None:
        path = setup.config.vsock.socket_path(setup.config.name)
        print(f"pyrovm qemu: vhost-vsock is pyrovm's Unix-socket vsock at {path} (Firecracker's protocol)",
              file=sys.stderr)  # fmt: skip
    if setup.sandbox:
        from ..seccomp import enable

        try:
            enable()
        except PyrovmError as exc:
            return _fail(str(exc))
    signals = SignalWorker(None)
    signals.install()
    qmp = None
    try:
        try:
            vm = VM.from_config(setup.config)
        except KvmError as exc:
            return _fail(f"KVM refused to build the VM: {exc}")
        except PyrovmError as exc:
            return _fail(str(exc))
        signals.attach(vm)
        try:
            if setup.qmp is not None:
                qmp = QmpServer(setup.qmp, vm)
        except PyrovmError as exc:
            vm.close()
            return _fail(str(exc))
        if setup.daemonize:
            _daemonize()
        if setup.pidfile is not None:
            setup.pidfile.write_text(f"{os.getpid()}\n")
        if qmp is not None:
            qmp.start()
        ns = argparse.Namespace(
            console=setup.config.console, boot_timer=False, boot_marker=None, verbose=False
        )
        return run_vm(vm, ns, signals, START)
    finally:
        if qmp is not None:
            qmp.close()
        if setup.pidfile is not None:
            try:
                setup.pidfile.unlink()
            except OSError:
                pass
        signals.ignore()


if __name__ == "__main__":
    sys.exit(main())
