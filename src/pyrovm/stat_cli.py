"""``pyrovm stat PID``: KVM's statistics of a running pyrovm VM, live, like ``kvm_stat``.

A running pyrovm keeps the binary stats fds of its VM and of each vCPU open (``KVM_GET_STATS_FD``);
this command finds them in ``/proc/PID/fd`` (``anon_inode:kvm-vm-stats``, ``anon_inode:kvm-vcpu-stats``),
takes a copy of each with ``pidfd_getfd(2)`` (which needs ptrace permission on PID: root, or the same user
where ``kernel.yama.ptrace_scope`` allows it) and reads them with :mod:`pyrovm.kvm.stats`: one line per
non-zero statistic, its total and its rate per second, refreshed in place on a terminal.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import select
import shutil
import sys
import time

from .errors import PyrovmError
from .kvm.stats import StatsError, StatsGroup, StatsReader, format_table, stat_rows

#: pidfd_getfd(2) on x86-64 (Linux 5.6)
SYS_PIDFD_GETFD = 438

VM_STATS_LINK = "anon_inode:kvm-vm-stats"
VCPU_STATS_LINK = "anon_inode:kvm-vcpu-stats"  # Linux adds ":N" (the vCPU id)

_CLEAR = "\x1b[H\x1b[2J"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"


class StatCommandError(PyrovmError):
    """A failure the command reports as one line (status 2)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy (close-on-exec) of file descriptor *target_fd* of the process behind *pidfd*."""
    ret = _libc.syscall(
        ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(target_fd), ctypes.c_uint(0)
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _stats_links(pid: int) -> list[int]:
    """The fd numbers of *pid*'s KVM stats fds."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise StatCommandError(f"no process {pid}") from None
    except PermissionError:
        raise StatCommandError(
            f"cannot list {fd_dir}: permission denied (run as root or as its user)"
        ) from None
    found = []
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if link == VM_STATS_LINK or link.startswith(VCPU_STATS_LINK):
            found.append(int(name))
    return sorted(found)


def _copy_fd(pidfd: int, pid: int, fd: int) -> int | None:
    """A copy of *pid*'s stats fd *fd*, or None when it was closed or reused meanwhile."""
    try:
        copy = pidfd_getfd(pidfd, fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return None
        if exc.errno == errno.EPERM:
            raise StatCommandError(
                f"not permitted to take file descriptors of process {pid} (pidfd_getfd needs ptrace "
                "permission: run as root, or as its user with kernel.yama.ptrace_scope = 0)"
            ) from None
        if exc.errno == errno.ESRCH:
            raise StatCommandError(f"process {pid} ended") from None
        raise StatCommandError(f"pidfd_getfd on process {pid}: {exc.strerror}") from None
    link = os.readlink(f"/proc/self/fd/{copy}")
    if link != VM_STATS_LINK and not link.startswith(VCPU_STATS_LINK):
        os.close(copy)
        return None
    return copy


def attach(pid: int) -> tuple[int, StatsGroup]:
    """A pidfd of *pid* and the :class:`StatsGroup` of its KVM stats fds (copies, ours to close)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise StatCommandError(f"no process {pid}") from None
    except OSError as exc:
        raise StatCommandError(f"cannot open process {pid}: {exc.strerror}") from None
    readers: list[StatsReader] = []
    try:
        for fd in _stats_links(pid):
            copy = _copy_fd(pidfd, pid, fd)
            if copy is not None:
                readers.append(StatsReader(copy))
        if not readers:
            raise StatCommandError(
                f"process {pid} has no KVM stats file descriptors open (not a running pyrovm VM, or a "
                "VMM that does not keep its KVM_GET_STATS_FD fds open)"
            )
    except BaseException:
        for reader in readers:
            reader.close()
        os.close(pidfd)
        raise
    return pidfd, StatsGroup.of(readers)


def _title(pid: int, group: StatsGroup, interval: float) -> str:
    return (
        f"pyrovm stat: process {pid} ({group.id}), {len(group.vm)} VM, {len(group.vcpus)} vCPUs, "
        f"rates over {interval:.2f} s"
    )


def _screen(pid: int, group: StatsGroup, lines: list[str], interval: float, tty: bool) -> str:
    text = [_title(pid, group, interval), "", *lines]
    if tty:
        size = shutil.get_terminal_size()
        text = [line[: size.columns] for line in text[: max(size.lines - 1, 3)]]
        return _CLEAR + "\n".join(text) + "\n"
    return "\n".join(text) + "\n\n"


def _ended(pidfd: int, timeout: float) -> bool:
    """Wait up to *timeout* s; True when the process ended (its pidfd becomes readable)."""
    ready, _, _ = select.select([pidfd], [], [], max(timeout, 0.0))
    return bool(ready)


def _watch(args: argparse.Namespace, pidfd: int, group: StatsGroup) -> int:
    tty = sys.stdout.isatty() and not args.once
    labels = group.vcpu_labels() if args.vcpus else []
    before = group.sample()
    if tty:
        sys.stdout.write(_HIDE_CURSOR)
    try:
        while True:
            ended = _ended(pidfd, args.interval - (time.monotonic() - before.time))
            now = group.sample()
            lines = format_table(stat_rows(group, now, before, show_all=args.all), labels)
            sys.stdout.write(_screen(args.pid, group, lines, now.time - before.time, tty))
            sys.stdout.flush()
            if args.once:
                return 0
            if ended:
                print(f"pyrovm stat: process {args.pid} ended", file=sys.stderr)
                return 0
            before = now
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            sys.stdout.write(_SHOW_CURSOR)
            sys.stdout.flush()


def _handler(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        print("pyrovm stat: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        pidfd, group = attach(args.pid)
    except (StatCommandError, StatsError) as exc:
        print(f"pyrovm stat: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    try:
        return _watch(args, pidfd, group)
    except StatsError as exc:
        print(f"pyrovm stat: {exc}", file=sys.stderr)
        return 2
    finally:
        group.close()
        os.close(pidfd)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``stat`` to the main CLI's subcommands; the handler is in ``args.func``."""
    parser = subparsers.add_parser(
        "stat",
        help="show KVM's statistics of a running pyrovm VM, live (like kvm_stat)",
        description=(
            "Show KVM's statistics (KVM_GET_STATS_FD) of the running pyrovm process PID: one line per "
            "counter, the VM's and the vCPUs' (summed over vCPUs; peaks: the maximum), with its total and "
            "its rate per second over the last interval, sorted by rate, then total. On a terminal the "
            "table refreshes in place until Ctrl-C. Needs ptrace permission on PID (root, or its user "
            "where kernel.yama.ptrace_scope allows it). Exit status 2: no such process, no KVM statistics "
            "in it, or no permission."
        ),
    )
    parser.add_argument("pid", type=int, metavar="PID", help="process id of a running pyrovm VM")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes, the period the rates are computed over (default 1)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="take two samples --interval apart, print the table once as plain lines and exit",
    )
    parser.add_argument(
        "--vcpus",
        action="store_true",
        help="add one column per vCPU (its rate per second for counters, its value for gauges)",
    )
    parser.add_argument("--all", action="store_true", help="show every statistic, zeros included")
    parser.set_defaults(func=_handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m pyrovm.stat_cli PID ...``)."""
    parser = argparse.ArgumentParser(prog="pyrovm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stat", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): as if killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
