"""seccomp filters for pyrovm's threads, through libseccomp (Debian's ``libseccomp2``, via ctypes).

Each pyrovm thread says its role when it starts (:func:`thread_role`: ``vcpu``, ``io``, ``api``; the
front ends call it for ``main`` once the VM runs).  When a front end enabled filtering (:func:`enable`;
``pyrovm run``, ``serve``, ``snapshot restore`` and ``qemu`` do unless ``--no-seccomp``), the thread then
installs its role's filter: the threads that handle what the guest controls get allow-lists — a vCPU thread
may make only the system calls its exits need (``ioctl`` only with the KVM requests of a running vCPU), the
I/O thread those of the devices' backends, the main thread, once the VM runs, what it needs to wait, write
metrics and close everything (no ``execve``, no process ``clone``, ``socket`` for AF_UNIX only) — and the
API thread, which builds VMs (any file, every KVM ioctl, passt started as a child that inherits its
filter), a deny-list of what a VMM never needs (``ptrace``, ``mount``, module loading, ``bpf``, ``kexec``,
...).  ``PYROVM_SECCOMP_LOG=ROLE[,ROLE]`` (development) lets those roles' calls outside their allow-lists
through and has the kernel log them (dmesg: audit type=1326), to find what a list lacks.  The lists are
data: ``seccomp_filters.json`` beside this module, or
the user's own file in the same format (``--seccomp-filter FILE``).

A system call a filter does not allow raises SIGSYS in the thread that made it; pyrovm's handler prints
one line naming the system call, its number and the thread, and ends the process with status 159
(128 + SIGSYS).  Filters are per thread and inherited by the threads a filtered thread starts.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from .errors import ConfigError, HostError

FILTERS = Path(__file__).with_name("seccomp_filters.json")
EXIT_STATUS = 128 + signal.SIGSYS
ROLES = ("vcpu", "io", "api", "main")

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ERRNO_EACCES = 0x00050000 | 13
#: always allowed by an allow-list: the SIGSYS report takes Python's lock (futex), writes its line and
#: exits; and the kick (tgkill), which glibc sends with every signal blocked, where no report could run
REPORT_NEEDS = ("write", "exit_group", "rt_sigreturn", "futex", "tgkill")
SCMP_CMP_EQ = 4
PR_SET_NAME = 15
SYS_SWAPOFF = 168
SA_SIGINFO = 4
SA_ONSTACK = 0x08000000
SA_RESTORER = 0x04000000

_libc = ctypes.CDLL(None, use_errno=True)


class SeccompError(HostError):
    """Filters cannot be set up (no libseccomp, a bad filter file)."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def name_thread(name: str) -> None:
    """The OS name of the calling thread (``top -H``, ``/proc/PID/task/TID/comm``, audit records)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class _Lib:
    """The few libseccomp calls pyrovm uses."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:  # not under its usual name: ask ldconfig (ctypes.util: slow, imports much)
            from ctypes.util import find_library

            path = find_library("seccomp")
            try:
                lib = ctypes.CDLL(path or "libseccomp.so.2", use_errno=True)
            except OSError:
                raise SeccompError(
                    "libseccomp is not installed (Debian: libseccomp2); or run with --no-seccomp"
                ) from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_void_p,
        ]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
        self.lib = lib

    def number(self, name: str) -> int:
        nr = int(self.lib.seccomp_syscall_resolve_name(name.encode()))
        if nr < 0:
            raise SeccompError(f"seccomp filter: unknown system call {name!r}")
        return nr

    def name(self, nr: int) -> str:
        ptr = self.lib.seccomp_syscall_resolve_num_arch(0, nr)  # 0: the native architecture
        if not ptr:
            return f"syscall {nr}"
        name = ctypes.string_at(ptr).decode()
        _libc.free(ctypes.c_void_p(ptr))
        return name

    def load(self, default: int, rules: list[tuple[int, int, list[tuple[int, int]]]]) -> None:
        """A filter with *default* action and ``(action, syscall, [(arg index, value), ...])`` rules
        (several rules for one call: any of them), installed for the calling thread."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise SeccompError("seccomp_init failed")
        try:
            for action, nr, conds in rules:
                cmps = (_ArgCmp * max(len(conds), 1))(*[_ArgCmp(a, SCMP_CMP_EQ, v, 0) for a, v in conds])
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conds), cmps if conds else None)
                if rc < 0:
                    raise SeccompError(f"seccomp rule for {self.name(nr)}: {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise SeccompError(f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


class Policy:
    """The filters of every role (from a filter file) and how to install them."""

    def __init__(self, data: dict[str, Any], lib: _Lib, source: str) -> None:
        self.lib = lib
        self.source = source
        self.roles: dict[str, tuple[int, list[tuple[int, int, list[tuple[int, int]]]]]] = {}
        for role in ROLES:
            spec = data.get(role)
            if not isinstance(spec, dict):
                raise SeccompError(f"{source}: no filter for role {role!r}")
            self.roles[role] = self._compile(role, spec)

    def _compile(
        self, role: str, spec: dict[str, Any]
    ) -> tuple[int, list[tuple[int, int, list[tuple[int, int]]]]]:
        kind = spec.get("kind")
        if kind not in ("allow", "deny"):
            raise SeccompError(f"{self.source}: role {role}: kind must be 'allow' or 'deny'")
        calls = spec.get("syscalls")
        if not isinstance(calls, list) or not all(isinstance(c, str) for c in calls):
            raise SeccompError(f"{self.source}: role {role}: syscalls must be a list of names")
        default, action = (
            (SCMP_ACT_TRAP, SCMP_ACT_ALLOW) if kind == "allow" else (SCMP_ACT_ALLOW, SCMP_ACT_TRAP)
        )
        rules: list[tuple[int, int, list[tuple[int, int]]]] = []
        soft = spec.get("errno", [])
        if kind == "allow" and isinstance(soft, list):  # these fail with EACCES instead of stopping pyrovm
            rules += [(SCMP_ACT_ERRNO_EACCES, self.lib.number(str(name)), []) for name in soft]
        args = spec.get("args", {})
        if kind == "allow":  # what the SIGSYS report itself needs, whatever the file says
            calls = calls + [c for c in REPORT_NEEDS if c not in calls]
            if role in os.environ.get("PYROVM_SECCOMP_LOG", "").split(","):
                default = SCMP_ACT_LOG  # (development: calls outside the list go to the kernel's log)
        for name in calls:
            if name in args:  # allowed only with these values of an argument
                index, values = args[name]["index"], args[name]["values"]
                rules += [
                    (
                        action,
                        self.lib.number(name),
                        [(int(index), int(v, 0) if isinstance(v, str) else int(v))],
                    )
                    for v in values
                ]
            else:
                rules.append((action, self.lib.number(name), []))
        return default, rules

    def install(self, role: str) -> None:
        default, rules = self.roles[role]
        self.lib.load(default, rules)


_policy: Policy | None = None
_roles: dict[int, str] = {}
_handler_ref: Any = None


def thread_role(role: str, name: str | None = None) -> None:
    """The calling pyrovm thread has *role*: name it, and install the role's filter if filtering is on."""
    name_thread(name or f"pyrovm-{role}")
    tid = threading.get_native_id()
    _roles[tid] = role
    discover = os.environ.get("PYROVM_SECCOMP_DISCOVER")
    if discover:  # (development: which thread has which role, for strace -ff)
        with open(discover, "a") as f:
            f.write(f"{tid} {role}\n")
    if _policy is not None:
        _policy.install(role)
        if os.environ.get("PYROVM_SECCOMP_TEST_VIOLATION") == role:  # the tests' way to provoke a denial
            _libc.syscall(SYS_SWAPOFF, None)  # (never allowed: denied by every role's filter)


def enabled() -> bool:
    return _policy is not None


def enable(filter_file: str | os.PathLike[str] | None = None) -> None:
    """Turn filtering on for the threads that start from now on (and install the SIGSYS report).
    *filter_file*: the user's filters instead of pyrovm's.  SeccompError / ConfigError for bad input."""
    global _policy
    path = Path(filter_file) if filter_file is not None else FILTERS
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"seccomp filter {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"seccomp filter {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"seccomp filter {path}: not a JSON object")
    lib = _Lib()
    policy = Policy(data, lib, str(path))
    _install_sigsys_report(lib)
    _policy = policy


class _SigInfo(ctypes.Structure):
    _fields_ = [
        ("signo", ctypes.c_int),
        ("errno", ctypes.c_int),
        ("code", ctypes.c_int),
        ("pad", ctypes.c_int),
        ("call_addr", ctypes.c_void_p),
        ("syscall", ctypes.c_int),
        ("arch", ctypes.c_uint),
    ]


def _install_sigsys_report(lib: _Lib) -> None:
    """A SIGSYS handler (SA_SIGINFO, in the thread that made the call): one line, then exit 159."""
    global _handler_ref
    if _handler_ref is not None:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_SigInfo), ctypes.c_void_p)

    def report(signum: int, info: Any, context: Any) -> None:
        nr = info.contents.syscall
        tid = threading.get_native_id()
        role = _roles.get(tid, "main")
        thread = threading.current_thread().name
        msg = (
            f"pyrovm: seccomp: thread {thread} ({role}) made system call {lib.name(nr)} ({nr}), which its "
            f"filter does not allow: stopping (status {EXIT_STATUS})\n"
        )
        os.write(2, msg.encode())
        os._exit(EXIT_STATUS)

    _handler_ref = handler_type(report)

    class _SigAction(ctypes.Structure):  # glibc's struct sigaction
        _fields_ = [
            ("handler", ctypes.c_void_p),
            ("mask", ctypes.c_uint64 * 16),
            ("flags", ctypes.c_int),
            ("restorer", ctypes.c_void_p),
        ]

    act = _SigAction()
    act.handler = ctypes.cast(_handler_ref, ctypes.c_void_p)
    act.flags = SA_SIGINFO
    sigaction = _libc.sigaction
    sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.c_void_p]
    if sigaction(signal.SIGSYS, ctypes.byref(act), None) != 0:
        raise SeccompError(f"sigaction(SIGSYS): {os.strerror(ctypes.get_errno())}")
