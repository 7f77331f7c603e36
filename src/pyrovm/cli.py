"""The ``pyrovm`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from . import __version__

if TYPE_CHECKING:
    from .config import VmConfig

_START = time.monotonic()

EPILOG_RUN = """\
exit status:
  0      the guest stopped cleanly (reset through the i8042 as with Linux reboot=k, power-off, halt)
  odd    the guest wrote V to the exit port 0xf4: status (V << 1) | 1, as QEMU's isa-debug-exit
  2      bad input (missing kernel, bad size, an output path that names an input, no /dev/kvm, ...)
  4      the guest crashed (triple fault, KVM internal error, failed entry)
  6      the guest kernel panicked
  8      pyrovm itself failed (a bug or an I/O error of the VMM; -v shows the traceback)
  124    --timeout ran out
  130    stopped by SIGINT (Ctrl-C when the console is not the terminal)
  128+N  stopped by signal N (143 SIGTERM, 129 SIGHUP); SIGUSR1 only writes --metrics

examples:
  pyrovm run --kernel "$(pyrovm guest build | tail -1)" --cmdline test=hello
  pyrovm run --kernel bzImage --initrd initramfs.cpio --cpus 2 --memory 512M
"""


#: ``ExitCode.INTERNAL_ERROR`` (not imported: ``pyrovm --help`` stays fast).
INTERNAL_ERROR = 8


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` says, without importing shutil (which imports zlib,
    bz2 and lzma: 2 ms and 1 MiB that ``pyrovm run`` does not need)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (status 2); subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_terminal_columns() - 2)  # type: ignore[call-arg]


def _fail(message: str) -> int:
    print(f"pyrovm: {message}", file=sys.stderr)
    return 2


def _run_config(args: argparse.Namespace) -> VmConfig:
    """The VmConfig for ``pyrovm run``'s options."""
    from .config import DEFAULT_CMDLINE, DiskSpec, NetSpec, VmConfig, VsockSpec, parse_size

    return VmConfig(
        kernel=args.kernel,
        memory=parse_size(args.memory),
        cpus=args.cpus,
        cmdline=DEFAULT_CMDLINE if args.cmdline is None else args.cmdline,
        initrd=args.initrd,
        boot=args.boot,
        disks=tuple(DiskSpec.parse(d) for d in args.disk),
        rootfs=None if args.rootfs is None else DiskSpec.parse(args.rootfs),
        rng=args.rng,  # a rate implies it (VmConfig)
        rng_rate=args.rng_rate,
        host_workarounds=args.host_workarounds,
        boot_marker=_boot_marker(args),
        console=args.console,
        metrics_path=args.metrics,
        timeout=args.timeout,
        kvm_device=args.kvm_device,
        net=tuple(NetSpec.parse(n) for n in args.net),
        name=args.name,
        vsock=None if args.vsock is None else VsockSpec.parse(args.vsock),
        track_dirty_pages=args.track_dirty_pages,
        coalesced_io=args.coalesced_io,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .errors import PyrovmError
    from .kvm import KvmError
    from .runner import SignalWorker, run_vm
    from .vmm import VM

    signals = SignalWorker(args.metrics)
    signals.install()  # first: a signal during start-up must not kill the VMM
    trace = None
    try:
        if not args.no_seccomp:
            from .seccomp import enable

            try:
                enable(args.seccomp_filter)
            except PyrovmError as exc:
                return _fail(str(exc))
        if getattr(args, "trace", None):
            from .trace.session import TraceSession

            try:
                trace = TraceSession.start(args.trace, args.trace_format, args.trace_exits, args.trace_kernel)
            except OSError as exc:
                return _fail(f"trace output {args.trace}: {exc.strerror}")
        try:
            vm = VM.from_config(_run_config(args))
        except KvmError as exc:
            return _fail(f"KVM refused to build the VM: {exc}")
        except PyrovmError as exc:
            return _fail(str(exc))
        if trace is not None:
            trace.attach(vm)
        signals.attach(vm)
        if vm.config.vsock is not None:
            print(
                f"pyrovm: vsock for guest CID {vm.vsock.cid} at {vm.vsock.path}", file=sys.stderr, flush=True
            )
        return run_vm(vm, args, signals, _START)
    finally:
        if trace is not None:
            trace.finish()
        signals.ignore()  # to the very end: the interpreter's exit would put the default actions back


DEFAULT_BOOT_MARKER = "Run /init as init process"


def _boot_marker(args: argparse.Namespace) -> str | None:
    if args.boot_marker:
        return str(args.boot_marker)
    return DEFAULT_BOOT_MARKER if args.boot_timer else None


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from . import testguest

    try:
        path = testguest.build(force=args.force)
    except RuntimeError as exc:
        return _fail(str(exc))
    print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .api.firecracker import main as fc_main

    return fc_main(args.fc_args, prog="pyrovm serve")


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor()


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pyrovm run`` and ``pyrovm trace`` (run's options plus the trace's)."""
    run = sub.add_parser(
        "run",
        help="boot a kernel in a new VM",
        description="Boot a kernel (Linux bzImage or vmlinux, or any ELF with a PVH note or a 64-bit "
        "entry) in a new VM and show its serial console.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run)
    run.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="record every KVM call and the kernel's KVM events into FILE ('-': stdout), as 'pyrovm trace'",
    )
    run.add_argument(
        "--trace-format", choices=("text", "jsonl", "chrome"), default="text", help="(default text)"
    )
    run.add_argument(
        "--trace-exits", type=int, default=50, metavar="N", help="exits listed one by one (default 50)"
    )
    run.set_defaults(func=_cmd_run, trace_kernel=True)
    trace = sub.add_parser(
        "trace",
        help="run a VM and show how it is made: every KVM call, what the kernel does",
        description="Run a VM as 'pyrovm run' does (same options) and show each KVM call pyrovm makes "
        "(its arguments decoded, its result and duration, the kernel functions behind it, checked against "
        "this kernel's /proc/kallsyms), the KVM_RUN exits (the first N one by one, then counted), and, as "
        "root, the kernel's own KVM trace events for this VM's threads, merged into one timeline, with "
        "KVM's statistics at the end. Without root the kernel side is left out and the reason said.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(trace)
    trace.add_argument("--format", dest="trace_format", choices=("text", "jsonl", "chrome"), default="text",
                       help="text: a narrated timeline; jsonl: a JSON object a line; chrome: Trace Event "
                       "JSON for Perfetto / chrome://tracing (default text)")  # fmt: skip
    trace.add_argument("--output", "-o", dest="trace", default="-", metavar="FILE", help="(default: stdout)")
    trace.add_argument("--exits", dest="trace_exits", type=int, default=50, metavar="N",
                       help="KVM_RUN exits listed one by one before only counting (default 50)")  # fmt: skip
    trace.add_argument("--no-kernel", dest="trace_kernel", action="store_false",
                       help="do not record the kernel's trace events (tracefs)")  # fmt: skip
    trace.set_defaults(func=_cmd_run)


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The options of ``pyrovm run`` (an argparse table)."""
    run.add_argument("--kernel", required=True, metavar="PATH", help="kernel image to boot")
    run.add_argument(
        "--memory",
        "-m",
        default="128M",
        metavar="SIZE",
        help="guest RAM, e.g. 128M, 1G (a bare number is MiB; default 128M)",
    )
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument(
        "--cmdline",
        default=None,
        metavar="STR",
        help="kernel command line (default: 'console=ttyS0 reboot=k panic=-1')",
    )
    run.add_argument("--initrd", default=None, metavar="PATH", help="initial ramdisk (initramfs cpio)")
    run.add_argument(
        "--console",
        default="stdio",
        metavar="stdio|none|file:PATH",
        help="where the serial console goes (default stdio); it is also kept in memory",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop the VM after S seconds (exit status 124)",
    )
    run.add_argument(
        "--boot",
        choices=("auto", "pvh", "linux64"),
        default="auto",
        help="entry for ELF kernels: the PVH 32-bit entry or the 64-bit Linux boot protocol "
        "(default: PVH when the ELF has the note)",
    )
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[,ro][,serial=ID]",
        help="a raw disk image as virtio-blk (repeatable; the first is /dev/vda); ro makes it "
        "read-only, serial= sets the id the guest reads",
    )
    run.add_argument(
        "--rootfs",
        default=None,
        metavar="PATH[,ro]",
        help="a disk image put first (/dev/vda) and booted as the root file system "
        "(adds root=/dev/vda rw unless --cmdline has a root=); make one with 'pyrovm disk create'",
    )
    run.add_argument("--rng", action="store_true", help="add a virtio-rng entropy device (host getrandom)")
    run.add_argument(
        "--rng-rate",
        type=int,
        default=None,
        metavar="BYTES_PER_S",
        help="virtio-rng with a byte-rate limit (implies --rng)",
    )
    run.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="SPEC",
        help="a virtio-net NIC (repeatable; eth0, eth1...): 'tap=NAME[,mac=MAC][,mtu=N]' on a tap device, "
        "or 'user[,hostfwd=tcp|udp:[HOSTADDR]:HOSTPORT-:GUESTPORT]...[,mac=MAC][,mtu=N]' for rootless "
        "networking through passt (the guest gets an address by DHCP; HOSTADDR defaults to 127.0.0.1). "
        "The MAC defaults to one derived from --name and the NIC's index; mtu defaults to 1500",
    )
    run.add_argument(
        "--vsock",
        default=None,
        metavar="cid=N[,uds=PATH]",
        help="a virtio-vsock device for guest CID N (3 or more), Firecracker's hybrid vsock: host programs "
        "connect to the Unix socket PATH and write 'CONNECT <port>\\n' (answer 'OK <port>\\n'); the guest's "
        "connections to host port P go to PATH_P. PATH defaults to $XDG_RUNTIME_DIR/pyrovm-NAME.vsock "
        "(/tmp without it) and is printed on stderr",
    )
    run.add_argument(
        "--name",
        default="pyrovm",
        help="the VM's name (default 'pyrovm'); default MAC addresses derive from it, so give VMs on one "
        "network different names",
    )
    run.add_argument(
        "--api-sock",
        default=None,
        metavar="PATH",
        help="serve the Firecracker-compatible API for this VM on the Unix socket PATH: pause, resume, "
        "snapshot it ('pyrovm snapshot create --api-sock PATH'), metrics",
    )
    run.add_argument(
        "--track-dirty-pages",
        action="store_true",
        help="track the pages the guest and the devices write, so that diff snapshots can be taken",
    )
    run.add_argument(
        "--metrics",
        default=None,
        metavar="FILE",
        help="write JSON counters (exit reason, vCPU exits, per-device requests/bytes/errors/"
        "interrupts) to FILE when the VM ends, and on SIGUSR1",
    )
    run.add_argument(
        "--no-coalesced-io",
        dest="coalesced_io",
        action="store_false",
        help="every guest write exits to pyrovm at once; by default KVM queues the writes that may wait "
        "(the UART's transmit register while its interrupt is off, the CMOS index port) and pyrovm "
        "serves them before the next exit",
    )
    run.add_argument(
        "--no-host-workarounds",
        dest="host_workarounds",
        action="store_false",
        help="on a PVM host, boot a Linux kernel as given (no added command-line options, no Intel CPU "
        "vendor); by default pyrovm adds what Linux needs there",
    )
    run.add_argument(
        "--boot-timer",
        action="store_true",
        help="report on stderr the time from start to the guest's write of 123 to the boot-timer device "
        "(MMIO 0xc0001000) and to the first console line matching --boot-marker",
    )
    run.add_argument(
        "--boot-marker",
        default=None,
        metavar="REGEX",
        help=f"report the time to the first console line matching REGEX (default with --boot-timer: "
        f"'{DEFAULT_BOOT_MARKER}')",
    )
    run.add_argument(
        "--no-seccomp",
        action="store_true",
        help="no seccomp filters (by default each of pyrovm's threads runs under a filter of its role: see "
        "README 'Security')",
    )
    run.add_argument(
        "--seccomp-filter",
        default=None,
        metavar="FILE",
        help="seccomp filters to use instead of pyrovm's (JSON, as src/pyrovm/seccomp_filters.json)",
    )
    run.add_argument(
        "--kvm-device",
        default=os.environ.get("PYROVM_KVM_DEVICE", "/dev/kvm"),
        metavar="PATH",
        help="the KVM device to open (default: $PYROVM_KVM_DEVICE or /dev/kvm)",
    )
    run.add_argument(
        "--verbose", "-v", action="store_true", help="report how the VM ended on stderr, and log more"
    )


def build_parser(with_tools: bool = True, command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; *with_tools* False leaves out the commands other than *command*'s that cost
    imports (kernel, initramfs, disk, snapshot, stat)."""
    parser = _Parser(
        prog="pyrovm",
        description="pyrovm: a virtual machine monitor in Python on Linux KVM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyrovm {__version__}")
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(  # type: ignore[assignment]
        dest="command", metavar="COMMAND"
    )
    sub.required = True

    _add_run_parser(sub)
    if not with_tools and command == "run":  # (the others' parsers are not needed: start-up)
        return parser
    if with_tools or command in ("snapshot", "stat"):
        from .snapshot.cli import register as register_snapshot
        from .stat_cli import register as register_stat

        register_snapshot(sub)
        register_stat(sub)

    guest = sub.add_parser(
        "guest",
        help="the project's test guest",
        description="Build the test guest (a small C + asm PVH kernel used by the tests and benchmarks).",
    )
    guest_sub = guest.add_subparsers(dest="guest_command", metavar="ACTION")
    guest_sub.required = True
    gb = guest_sub.add_parser("build", help="build the test guest if needed and print its path (last line)")
    gb.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    gb.set_defaults(func=_cmd_guest_build)

    doctor = sub.add_parser(
        "doctor",
        help="check that this host can run VMs",
        description="Check /dev/kvm, the KVM API and capabilities, PVM or hardware "
        "virtualization, then boot the test guest and time an exit round trip.",
    )
    doctor.set_defaults(func=_cmd_doctor)

    serve = sub.add_parser(
        "serve",
        help="serve the Firecracker-compatible API on a Unix socket",
        description="The Firecracker-compatible API (the same server as pyrovm-firecracker, whose flags it "
        "takes: see 'pyrovm-firecracker --help'). The guest console is this process's stdin/stdout.",
    )
    serve.add_argument(
        "fc_args", nargs=argparse.REMAINDER, help="pyrovm-firecracker's flags (--api-sock PATH...)"
    )
    serve.set_defaults(func=_cmd_serve)
    qemu = sub.add_parser(
        "qemu",
        help="run a qemu-system-x86_64 -enable-kvm command line (pyrovm-qemu-system-x86_64)",
        description="Take QEMU's options (-M, -m, -smp, -cpu, -kernel, -drive, -device, -netdev, -serial, "
        "-qmp...) and run the VM with pyrovm; see 'pyrovm qemu -help'.",
    )
    qemu.add_argument("qemu_args", nargs=argparse.REMAINDER, help="QEMU's options")
    jail = sub.add_parser(
        "jail",
        help="run 'pyrovm run' or 'serve' in a jail (namespaces, pivot_root, an unprivileged user)",
        description="pyrovm jail --id ID --uid U --gid G [--chroot-base DIR] [--new-netns] [--rlimit NAME=N] "
        "[--cgroup FILE=VALUE] -- run|serve ARGS...; see 'pyrovm jail --help'.",
    )
    jail.add_argument("jail_args", nargs=argparse.REMAINDER, help="the jailer's options, -- and pyrovm's")

    if with_tools:
        from . import disk, initramfs
        from .kernel import build as kernel_build

        kernel_build.register(sub)
        initramfs.register(sub)
        disk.register(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    """The library logs; the command shows warnings (and with -v information) on stderr, one line each."""
    import logging

    root = logging.getLogger("pyrovm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyrovm: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    if command == "jail" and args_list[0] == "jail":  # its own options, then pyrovm's after --
        from .jail import main as jail_main

        return jail_main(args_list[1:])
    if command == "qemu" and args_list[0] == "qemu":  # QEMU's options, all of them, to the QEMU front end
        from .qemu.cli import main as qemu_main

        return qemu_main(args_list[1:])
    if command == "serve" and args_list[0] == "serve":
        # pyrovm-firecracker's flags, all of them (argparse's REMAINDER would take options as its own)
        from .api.firecracker import main as fc_main

        return fc_main(args_list[1:], prog="pyrovm serve")
    # the kernel/initramfs/disk modules cost ~25 ms of imports that `pyrovm run` does not need
    fast = ("run", "guest", "doctor", "trace", "snapshot", "stat")
    parser = build_parser(with_tools=command not in fast, command=command)
    args = parser.parse_args(args_list)
    verbose = bool(getattr(args, "verbose", False))
    _setup_logging(verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): as if killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except RuntimeError as exc:
        if "can't start new thread" not in str(exc):
            return _internal_error(exc, verbose)
        print(
            "pyrovm: cannot start a thread: the process is out of threads (its cgroup's pids.max, "
            "RLIMIT_NPROC or the host's threads-max)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    except Exception as exc:
        return _internal_error(exc, verbose)


def _internal_error(exc: BaseException, verbose: bool) -> int:
    """One line for a bug in pyrovm (the traceback with -v), its own status."""
    if verbose:
        import traceback

        traceback.print_exc()
    where = exc.__traceback__
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    place = f" at {os.path.basename(where.tb_frame.f_code.co_filename)}:{where.tb_lineno}" if where else ""
    print(
        f"pyrovm: internal error{place}: {type(exc).__name__}: {exc} (-v shows the traceback)",
        file=sys.stderr,
    )
    return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
