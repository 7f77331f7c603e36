"""``pyrovm jail``: run ``pyrovm run`` or ``pyrovm serve`` in a jail, as Firecracker's jailer does.

``pyrovm jail --id ID --uid U --gid G [--chroot-base DIR] [--new-netns] [--rlimit nofile=N] [--rlimit
fsize=BYTES] [--cgroup FILE=VALUE]... -- run|serve ARGS...``: the jailer (root) makes the VM's cgroups
(:mod:`pyrovm.cgroups`) and moves into them, then ``DIR/pyrovm/ID/root``; in new mount, PID,
IPC and UTS namespaces (and a new network namespace with ``--new-netns``) it bind-mounts into it, read-only,
only what pyrovm needs: the Python installation and pyrovm itself (the directories of ``sys.path``), the
system's libraries (``/usr``, ``/lib``, ``/lib64``), and the VM's own files named on the command line
(``--kernel``, ``--initrd``, ``--disk``/``--rootfs`` images, read-write unless ``,ro``; the directories of
``--api-sock``, ``--metrics``, ``--console file:``, ``--trace``, read-write), each at its own path; it makes
the device nodes ``/dev/kvm``, ``/dev/net/tun``, ``/dev/urandom`` and ``/dev/null`` owned by the user, a new
``/proc`` (the jail's own PIDs only) and a ``/tmp``; ``pivot_root``s into it, sets the resource limits,
drops to the user and group with no supplementary groups, sets ``no_new_privs``, and only then executes
pyrovm, which installs its seccomp filters before the first guest instruction.  The jailer waits and exits
with pyrovm's status.  Files the VM uses must be readable (images writable) by the user.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import stat
import sys
from pathlib import Path

from . import cgroups
from .errors import ConfigError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
DEVICES = {"dev/kvm": (10, 232), "dev/net/tun": (10, 200), "dev/urandom": (1, 9), "dev/null": (1, 3)}
RLIMITS = {"nofile": "RLIMIT_NOFILE", "fsize": "RLIMIT_FSIZE", "nproc": "RLIMIT_NPROC", "as": "RLIMIT_AS"}
INPUTS = ("--kernel", "--initrd", "--seccomp-filter")
OUTPUT_DIRS = ("--api-sock", "--metrics", "--trace")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            src.encode(),
            dst.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {src} on {dst}",
    )


def _bind(root: Path, path: Path, read_only: bool) -> None:
    """Bind-mount host *path* at the same path under *root* (read-only unless told)."""
    target = root / str(path).lstrip("/")
    if path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount(str(path), str(target), None, MS_BIND | MS_REC)
    if read_only:
        _mount(str(path), str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def vm_paths(args: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """(read-only files, read-write files, read-write directories) named by pyrovm's command line."""
    ro: list[Path] = []
    rw: list[Path] = []
    dirs: list[Path] = []
    for i, word in enumerate(args[:-1]):
        value = args[i + 1]
        if word in INPUTS:
            ro.append(Path(value))
        elif word in ("--disk", "--rootfs"):
            path, *opts = value.split(",")
            (ro if "ro" in opts else rw).append(Path(path))
        elif word in OUTPUT_DIRS and value != "-":
            dirs.append(Path(value).resolve().parent)
        elif word == "--console" and value.startswith("file:"):
            dirs.append(Path(value[5:]).resolve().parent)
    return [p.resolve() for p in ro], [p.resolve() for p in rw], dirs


def _python_dirs() -> list[Path]:
    """The directories the interpreter and pyrovm are loaded from, outermost first, without nesting."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent}
    paths |= {Path(p) for p in sys.path if p and Path(p).is_dir()}
    keep: list[Path] = []
    for p in sorted(paths, key=lambda p: len(p.parts)):
        if not any(p == k or k in p.parents for k in keep) and p not in (Path("/"), Path("/usr")):
            keep.append(p)
    return keep


def build_root(root: Path, uid: int, gid: int, args: list[str], binds: list[str] = []) -> None:  # noqa: B006
    """Populate the jail's root (in the new mount namespace, as root)."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    root.mkdir(parents=True, mode=0o755)
    _mount(str(root), str(root), None, MS_BIND | MS_REC)
    for name in ("proc", "tmp", "old_root"):
        (root / name).mkdir(exist_ok=True)
    # /tmp first: whatever lives under the host's /tmp (pyrovm itself, the VM's files) goes on top of it
    _mount("tmpfs", str(root / "tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    for system in ("/usr", "/lib", "/lib64", "/bin"):
        if Path(system).exists() and not Path(system).is_symlink():
            _bind(root, Path(system), True)
        elif Path(system).is_symlink():
            (root / system.lstrip("/")).symlink_to(os.readlink(system))
    for pydir in _python_dirs():
        _bind(root, pydir, True)
    ro, rw, dirs = vm_paths(args)
    for item in binds:
        path, _, mode = item.partition(":")
        (rw if mode == "rw" else ro).append(Path(path).resolve())
    for p in ro:
        _bind(root, p, True)
    for p in rw:
        _bind(root, p, False)
    for d in dirs:
        _bind(root, d, False)
    for rel, (major, minor) in DEVICES.items():
        node = root / rel
        node.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        os.chown(node, uid, gid)


def enter(root: Path, uid: int, gid: int, rlimits: dict[str, int]) -> None:
    """pivot_root into *root*, a new /proc, limits, then the user (no way back: no_new_privs)."""
    import resource

    os.chdir(root)
    _check(_libc.syscall(155, b".", b"old_root"), "pivot_root")  # 155: pivot_root on x86-64
    os.chdir("/")
    _check(_libc.umount2(b"/old_root", MNT_DETACH), "umount old root")
    os.rmdir("/old_root")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name, value in rlimits.items():
        res = getattr(resource, RLIMITS[name])
        resource.setrlimit(res, (value, value))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyrovm jail", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--id", required=True, help="the VM's id: the jail is CHROOT_BASE/pyrovm/ID/root")
    p.add_argument("--uid", type=int, required=True, help="the user pyrovm runs as")
    p.add_argument("--gid", type=int, required=True, help="the group pyrovm runs as")
    p.add_argument("--chroot-base", default="/srv/jailer", help="where jails are made (default /srv/jailer)")
    p.add_argument("--new-netns", action="store_true", help="a network namespace of its own (no host NICs)")
    p.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="PATH[:rw]",
        help="a file or directory to put in the jail at the same path (read-only unless :rw), "
        "e.g. a kernel or disk a 'serve' jail will be given through the API; repeatable",
    )
    p.add_argument(
        "--rlimit",
        action="append",
        default=[],
        metavar="NAME=N",
        help=f"a resource limit ({', '.join(RLIMITS)}), repeatable",
    )
    p.add_argument(
        "--cgroup",
        action="append",
        default=[],
        metavar="FILE=VALUE",
        help="a cgroup setting for the VM's own cgroup PARENT/ID, e.g. cpu.max='50000 100000', "
        "memory.max=256M, pids.max=64; v2 names work on cgroup v1 hosts too (translated); repeatable",
    )
    p.add_argument(
        "--cgroup-version",
        type=int,
        choices=(1, 2),
        help="cgroup v1 or v2 (default: the host's /sys/fs/cgroup)",
    )
    p.add_argument("--parent-cgroup", default="pyrovm", help="where the VM's cgroup goes (default pyrovm)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- run|serve ARGS...")
    return p.parse_args(argv)


def _check_args(ns: argparse.Namespace) -> tuple[list[str], dict[str, int], cgroups.Plan | None]:
    if os.geteuid() != 0:
        raise ConfigError("pyrovm jail needs root (it makes namespaces, mounts and device nodes)")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ns.id):
        raise ConfigError(f"--id {ns.id!r}: 1 to 64 letters, digits, '-' or '_'")
    if ns.uid <= 0 or ns.gid <= 0:
        raise ConfigError("--uid and --gid: an unprivileged user and group (not 0)")
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command or command[0] not in ("run", "serve"):
        raise ConfigError("give the command after --: run ... or serve ...")
    for item in ns.bind:
        path, _, mode = item.partition(":")
        if mode not in ("", "rw", "ro") or not Path(path).exists():
            raise ConfigError(f"--bind {item!r}: an existing PATH, optionally :rw")
    limits: dict[str, int] = {}
    for item in ns.rlimit:
        name, _, value = item.partition("=")
        if name not in RLIMITS or not value.isdecimal():
            raise ConfigError(f"--rlimit {item!r}: NAME=N with NAME one of {', '.join(RLIMITS)}")
        limits[name] = int(value)
    cgroups.check_parent(ns.parent_cgroup)
    plan = None
    if ns.cgroup:
        plan = cgroups.plan(ns.cgroup, ns.cgroup_version, ns.parent_cgroup, ns.id, cgroups.read_mounts())
    return command, limits, plan


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    try:
        command, limits, plan = _check_args(ns)
        root = Path(ns.chroot_base) / "pyrovm" / ns.id / "root"
        if root.exists():
            raise ConfigError(f"{root} exists: another jail with id {ns.id}, or a stale one (remove it)")
        if plan:
            cgroups.make(plan)
    except ConfigError as exc:
        print(f"pyrovm jail: {exc}", file=sys.stderr)
        return 2
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNET if ns.new_netns else 0)
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            if plan:
                cgroups.join(plan, os.getpid())  # first: the limits hold for everything that follows
            _check(_libc.unshare(flags), "unshare")
            build_root(root, ns.uid, ns.gid, command, ns.bind)
            inner = os.fork()  # the first child in the new PID namespace: PID 1 there
            if inner == 0:
                enter(root, ns.uid, ns.gid, limits)
                os.execv(sys.executable, [sys.executable, "-m", "pyrovm.cli", *command])
            _, status = os.waitpid(inner, 0)
            code = os.waitstatus_to_exitcode(status)
            code = code if code >= 0 else 128 - code
        except OSError as exc:
            print(f"pyrovm jail: {exc.strerror or exc}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(root.parent, ignore_errors=True)  # (its mounts went with the mount namespace)
    if plan:
        cgroups.remove(plan)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
