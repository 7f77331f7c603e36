"""``pyrovm disk create``: sparse raw ext4 images for virtio-blk, made with ``mkfs.ext4``."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import PyrovmError

DEFAULT_LABEL = "pyrovm"
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
#: mkfs.ext4 cannot make a useful file system below this.
MIN_SIZE = 1 << 20


class DiskError(PyrovmError):
    """A disk image could not be made; the message is one line for the user."""


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864.  Suffixes K, M, G, T (powers of 1024), optionally followed by B or iB."""
    m = _SIZE_RE.match(text)
    if not m:
        raise DiskError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix (e.g. 64M)")
    size = int(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if size < MIN_SIZE:
        raise DiskError(f"size {text!r} is too small: at least 1M")
    if size % 512:
        raise DiskError(f"size {text!r} is not a multiple of 512 bytes")
    return size


def find_mkfs() -> str:
    """The path of ``mkfs.ext4`` (also looked for in /sbin and /usr/sbin, often not in PATH)."""
    path = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        raise DiskError("mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)")
    return path


def create_disk(
    path: str | os.PathLike[str],
    size: int | str,
    from_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    label: str = DEFAULT_LABEL,
) -> Path:
    """Make a sparse raw ext4 image of *size* bytes (or "64M") at *path*, filled from *from_dir* if given.

    The image is made in a temporary file beside *path* and renamed over it only when ``mkfs.ext4``
    succeeded: a failure leaves nothing behind and an existing file unchanged.  With *force*, an existing
    image is replaced, but not while a VM uses it: it is locked as a VM locks its disks (``flock``), and
    the lock is held until the new image is in place.
    """
    target = Path(path)
    nbytes = parse_size(size) if isinstance(size, str) else size
    if nbytes < MIN_SIZE or nbytes % 512:
        raise DiskError(f"size {nbytes} must be at least 1M and a multiple of 512 bytes")
    try:
        if len(label.encode()) > 16:
            raise DiskError(f"label {label!r} is longer than 16 bytes")
    except UnicodeEncodeError as exc:
        raise DiskError(f"label {label!r} is not valid UTF-8") from exc
    if from_dir is not None and not _kind(Path(from_dir), stat.S_ISDIR):
        raise DiskError(f"{from_dir}: no such directory")
    exists = _kind(target, lambda mode: True)
    if exists and not force:
        raise DiskError(f"{target}: already exists (use --force to overwrite)")
    if exists and not _kind(target, stat.S_ISREG):
        raise DiskError(f"{target}: not a regular file")
    if not _kind(target.parent, stat.S_ISDIR):
        raise DiskError(f"{target.parent}: no such directory")
    mkfs = find_mkfs()
    with _locked_if_exists(target):
        # no stop signal between the temporary file's creation and the clean-up that removes it: one that
        # comes meanwhile is delivered once the mask is lifted inside the try below
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            tmp = _make_sparse(target, nbytes)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            _mkfs(mkfs, tmp, label, from_dir, target)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _kind(path: Path, test: Callable[[int], bool]) -> bool:
    """True when *path* exists and its mode passes *test*; DiskError for a path that cannot be looked at
    (a name too long, no permission)."""
    try:
        return test(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise DiskError(f"{path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _locked_if_exists(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on an existing *target* (DiskError when a VM has it)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    except OSError as exc:
        raise DiskError(f"{target}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DiskError(f"{target}: in use (locked by a running VM?): not overwritten") from exc
        yield
    finally:
        os.close(fd)


def _make_sparse(target: Path, nbytes: int) -> Path:
    """A new sparse file of *nbytes* beside *target* (removed again if it cannot get that size)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise DiskError(f"{target.parent}: {exc.strerror}") from exc
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, nbytes)  # sparse: no blocks allocated until mkfs writes metadata
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DiskError(f"{target}: cannot make a file of {nbytes} bytes: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return tmp


def _mkfs(mkfs: str, image: Path, label: str, from_dir: str | os.PathLike[str] | None, target: Path) -> None:
    cmd = [mkfs, "-F", "-q", "-L", label]
    if from_dir is not None:
        cmd += ["-d", str(from_dir)]
    cmd.append(str(image))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DiskError(f"{target}: mkfs.ext4 failed: {detail}")


class _Stopped(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _stop_on_signal(signum: int, frame: object) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # one is enough: more would interrupt the clean-up
    raise _Stopped(signum)


def _create_handler(args: argparse.Namespace) -> int:
    # SIGTERM/SIGHUP/SIGINT unwind like an error, so the temporary image is removed and nothing is left
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _stop_on_signal)
    try:
        path = create_disk(args.path, args.size, from_dir=args.from_dir, force=args.force, label=args.label)
    except DiskError as e:
        print(f"pyrovm disk create: {e}", file=sys.stderr)
        return 2
    except _Stopped as stop:
        print(f"pyrovm disk create: stopped by signal {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``disk create`` to the main CLI's subcommands; handlers are in ``args.func``."""
    disk = subparsers.add_parser("disk", help="make disk images", description="Make disk images.")
    sub = disk.add_subparsers(dest="disk_command", metavar="COMMAND")

    def usage(args: argparse.Namespace) -> int:
        disk.print_usage(sys.stderr)
        return 2

    disk.set_defaults(func=usage)
    create = sub.add_parser(
        "create",
        help="make a sparse raw ext4 image",
        description="Make a sparse raw ext4 image for virtio-blk with mkfs.ext4.",
    )
    create.add_argument("path", help="image file to create")
    create.add_argument("--size", required=True, help="image size, e.g. 64M or 2G (K/M/G/T suffixes)")
    create.add_argument("--from-dir", metavar="DIR", help="copy the contents of DIR into the file system")
    create.add_argument("--label", default=DEFAULT_LABEL, help=f"file system label (default {DEFAULT_LABEL})")
    create.add_argument("--force", action="store_true", help="overwrite an existing file")
    create.set_defaults(func=_create_handler)
    return disk


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m pyrovm.disk create ...``)."""
    parser = argparse.ArgumentParser(prog="pyrovm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["disk", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
