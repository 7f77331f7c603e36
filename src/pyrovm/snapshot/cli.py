"""``pyrovm snapshot create|restore|rebase|info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EPILOG_RESTORE = """\
The VM continues where the snapshot was taken: its console output goes on, its memory is mapped
copy-on-write from MEM (never written: many VMs restored from one snapshot share its pages).

Without --api-sock the VM runs in the foreground like 'pyrovm run' (--resume is required: nothing else
could resume it), with the same exit statuses. With --api-sock the Firecracker-compatible API serves it
(paused unless --resume): 'PATCH /vm {"state": "Resumed"}' lets it go, and it can be snapshotted again.

exit status: as 'pyrovm run'; 2 also for a bad snapshot (truncated, corrupted, another version or
architecture, a memory file of the wrong size, a device the restore cannot provide).

examples:
  pyrovm snapshot restore vm.state --mem vm.mem --resume
  pyrovm snapshot restore vm.state --mem vm.mem --resume --tap eth0=tap7 --vsock-uds /tmp/clone7.vsock \\
      --disk vda=clone7.img --name clone7
  pyrovm snapshot restore vm.state --mem vm.mem --api-sock /tmp/vm.sock
"""


def _fail(message: str) -> int:
    print(f"pyrovm: {message}", file=sys.stderr)
    return 2


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} {v!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _cmd_create(args: argparse.Namespace) -> int:
    from ..api.client import ApiFault, Client

    try:
        with Client(args.api_sock, timeout=120) as c:
            was_running = c.get("/")["state"] == "Running"
            if was_running:
                c.patch("/vm", state="Paused")
            try:
                kind = "Diff" if args.diff else "Full"
                c.put(
                    "/snapshot/create", snapshot_path=args.state, mem_file_path=args.mem, snapshot_type=kind
                )
            finally:
                if was_running and not args.keep_paused:
                    c.patch("/vm", state="Resumed")
    except ApiFault as e:
        return _fail(f"snapshot create: {e}")
    except OSError as e:
        return _fail(f"snapshot create: API socket {args.api_sock}: {e.strerror or e}")
    print(
        f"pyrovm: {'diff' if args.diff else 'full'} snapshot written: {args.state}, {args.mem}",
        file=sys.stderr,
    )
    return 0


def _options(args: argparse.Namespace) -> Any:
    from ..builder import RestoreOptions

    return RestoreOptions(
        console=args.console,
        metrics_path=None if args.metrics is None else Path(args.metrics),
        timeout=args.timeout,
        taps=_pairs(args.tap, "--tap"),
        vsock_uds=None if args.vsock_uds is None else Path(args.vsock_uds),
        disks={k: Path(v) for k, v in _pairs(args.disk, "--disk").items()},
        name=args.name,
        track_dirty_pages=args.track_dirty_pages,
        clock_realtime=args.clock_realtime,
    )


def _cmd_restore(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except ValueError as e:
        return _fail(str(e))
    if args.api_sock is not None:
        return _serve_restored(args, options)
    if not args.no_seccomp:
        from ..errors import PyrovmError
        from ..seccomp import enable

        try:
            enable(args.seccomp_filter)
        except PyrovmError as exc:
            return _fail(str(exc))
    if not args.resume:
        return _fail("snapshot restore: without --api-sock nothing could resume the VM: give --resume")
    from ..cli import _START
    from ..errors import PyrovmError
    from ..kvm import KvmError
    from ..runner import SignalWorker, run_vm
    from ..vmm import VM

    signals = SignalWorker(args.metrics)
    signals.install()
    try:
        try:
            vm = VM.restored(args.state, args.mem, options=options)
        except KvmError as exc:
            return _fail(f"KVM refused to restore the VM: {exc}")
        except PyrovmError as exc:
            return _fail(str(exc))
        signals.attach(vm)
        args.boot_timer, args.boot_marker = False, None
        return run_vm(vm, args, signals, _START)
    finally:
        signals.ignore()


def _serve_restored(args: argparse.Namespace, options: Any) -> int:
    from ..api.firecracker import main as fc_main
    from ..api.snapshots import restore_into
    from . import load_state

    def load(controller: Any) -> None:
        restore_into(controller, load_state(args.state), args.mem, options, resume=args.resume)

    argv = ["--api-sock", args.api_sock, "--id", args.name or "anonymous-instance"]
    argv += ["--no-seccomp"] if args.no_seccomp else []
    argv += ["--seccomp-filter", args.seccomp_filter] if args.seccomp_filter else []
    return fc_main(argv, prog="pyrovm snapshot restore", on_ready=load)


def _cmd_rebase(args: argparse.Namespace) -> int:
    from ..errors import SnapshotError
    from .memfile import rebase

    try:
        copied = rebase(args.base, args.diff)
    except SnapshotError as e:
        return _fail(str(e))
    print(f"pyrovm: {copied} bytes of {args.diff} written into {args.base}", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from ..errors import SnapshotError
    from . import load_state

    try:
        state = load_state(args.state)
    except SnapshotError as e:
        return _fail(str(e))
    info = {
        "kind": state.kind,
        "pyrovm_version": state.pyrovm_version,
        "created_at": state.created_at,
        "vcpus": len(state.vcpus),
        "memory_bytes": state.memory_size,
        "boot": state.boot.mode,
        "cmdline": state.boot.cmdline,
        "devices": sorted(state.devices),
        "tsc_khz": state.host.tsc_khz,
        "config": state.config,
    }
    print(json.dumps(info, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``snapshot`` and its actions to the main CLI."""
    snap = sub.add_parser(
        "snapshot",
        help="save a running VM and restore it in another process",
        description="Snapshots: a state file (versioned, checksummed) and a memory file (sparse).",
    )
    actions = snap.add_subparsers(dest="snapshot_command", metavar="ACTION")
    actions.required = True
    create = actions.add_parser(
        "create",
        help="snapshot a VM through its API socket (pyrovm run/serve --api-sock)",
        description="Pause the VM behind the API socket, write the snapshot, and resume it (a VM that was "
        "paused stays paused).",
    )
    create.add_argument("--api-sock", required=True, metavar="PATH", help="the VM's API socket")
    create.add_argument("state", help="the state file to write")
    create.add_argument("mem", help="the memory file to write (sparse)")
    create.add_argument(
        "--diff",
        action="store_true",
        help="only the pages written since the last snapshot (the VM needs dirty-page tracking); apply "
        "it to its base with 'pyrovm snapshot rebase'",
    )
    create.add_argument("--keep-paused", action="store_true", help="leave the VM paused afterwards")
    create.set_defaults(func=_cmd_create)
    _add_restore(actions)
    rebase = actions.add_parser(
        "rebase",
        help="apply a diff snapshot's memory file to its base",
        description="Write the pages of DIFF (a diff snapshot's memory file) into BASE (the memory file of "
        "the snapshot it was taken after); BASE then goes with the diff's state file.",
    )
    rebase.add_argument("base", help="the base memory file (written)")
    rebase.add_argument("diff", help="the diff memory file (read)")
    rebase.set_defaults(func=_cmd_rebase)
    info = actions.add_parser("info", help="check a state file and describe it (JSON)")
    info.add_argument("state", help="the state file")
    info.set_defaults(func=_cmd_info)


def _add_restore(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = actions.add_parser(
        "restore",
        help="restore a snapshot in this process",
        description="Restore a VM from a snapshot's state file and memory file.",
        epilog=EPILOG_RESTORE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("state", help="the state file")
    r.add_argument("--mem", required=True, help="the memory file (mapped copy-on-write, never written)")
    r.add_argument("--resume", action="store_true", help="run at once (else it waits paused)")
    r.add_argument("--api-sock", default=None, metavar="PATH", help="serve the Firecracker-compatible API")
    r.add_argument("--console", default="stdio", metavar="stdio|none|file:PATH", help="(default stdio)")
    r.add_argument(
        "--tap", action="append", default=[], metavar="ethN=TAP", help="another tap for NIC ethN (repeatable)"
    )
    r.add_argument(
        "--vsock-uds", default=None, metavar="PATH", help="another Unix socket for the vsock device"
    )
    r.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="vdX=PATH",
        help="another image for disk vdX (repeatable): each VM restored at once needs its own copy",
    )
    r.add_argument("--name", default=None, help="another name for the VM (its vsock socket default)")
    r.add_argument(
        "--clock-realtime",
        action="store_true",
        help="advance the guest's kvmclock by the wall time since the snapshot (default: the guest sees no "
        "time pass)",
    )
    r.add_argument(
        "--track-dirty-pages", action="store_true", help="dirty-page tracking, for diff snapshots of it"
    )
    r.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="stop after S seconds (status 124)"
    )
    r.add_argument("--metrics", default=None, metavar="FILE", help="write JSON counters at the end (as run)")
    r.add_argument("--no-seccomp", action="store_true", help="no seccomp filters (README 'Security')")
    r.add_argument(
        "--seccomp-filter", default=None, metavar="FILE", help="seccomp filters instead of pyrovm's"
    )
    r.add_argument("--verbose", "-v", action="store_true", help="report how the VM ended, log more")
    r.set_defaults(func=_cmd_restore)
