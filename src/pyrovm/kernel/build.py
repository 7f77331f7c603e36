"""Build a minimal Linux kernel for pyrovm guests, cached outside the repository.

The recipe: ``make tinyconfig``, merge ``microvm.config`` (plus ``pvm.config`` for the PVM variant) with
``scripts/kconfig/merge_config.sh -m``, ``make olddefconfig``, check that every fragment option landed in
``.config``, then ``make bzImage`` (which also links ``vmlinux``, the ELF image with the Xen PVH entry note).

The result lives in ``$PYROVM_CACHE/kernel/<key>/`` (``PYROVM_CACHE`` defaults to ``~/.cache/pyrovm``) with
``bzImage``, ``vmlinux``, ``.config`` and ``System.map``. The key hashes the source identity, the fragment
texts, the variant and the patch texts, so a second call with the same inputs returns at once.

The PVM variant (for hosts whose ``/dev/kvm`` is PVM, where guest CPL0 code is emulated instruction by
instruction) drops AMD CPU support and compiles out the int3 self-test of ``alternative_instructions()``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyrovm.errors import PyrovmError

__all__ = [
    "DEFAULT_SOURCE_PACKAGE",
    "DEFAULT_SOURCE_TARBALL",
    "PVM_PATCHES",
    "KernelBuildError",
    "SourcePatch",
    "apply_patch",
    "build_kernel",
    "cache_key",
    "cache_root",
    "check_config",
    "configure",
    "fragment_texts",
    "parse_config",
    "pvm_host",
    "register",
]

KERNEL_DIR = Path(__file__).resolve().parent
FRAGMENT = KERNEL_DIR / "microvm.config"
PVM_FRAGMENT = KERNEL_DIR / "pvm.config"

DEFAULT_SOURCE_PACKAGE = "linux-source-6.1"
DEFAULT_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")

# Bump when the recipe changes in a way the key's other inputs do not capture.
RECIPE_VERSION = "1"

# Build tools: (how to detect it, Debian package).
_BUILD_DEPS: tuple[tuple[str, str], ...] = (
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("xz", "xz-utils"),
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
)

Progress = Callable[[str], None]


class KernelBuildError(PyrovmError, RuntimeError):
    """A kernel build failed; the message says why in one line (plus detail lines where useful)."""


# --------------------------------------------------------------------------------------------------
# Source patches


@dataclass(frozen=True)
class SourcePatch:
    """A checked text substitution in one file of the kernel tree: ``old`` must occur exactly once."""

    path: str
    old: str
    new: str
    reason: str

    def text(self) -> str:
        """A stable text of the patch, for the cache key."""
        return f"--- {self.path}\n{self.reason}\n<<<\n{self.old}\n===\n{self.new}\n>>>\n"


PVM_PATCHES: tuple[SourcePatch, ...] = (
    SourcePatch(
        path="arch/x86/kernel/alternative.c",
        old="\tu64 ibt;\n\n\tint3_selftest();\n",
        new=(
            "\tu64 ibt;\n\n"
            "\t/* pyrovm: PVM's CPL0 emulator cannot execute int3, so the self-test is compiled out. */\n"
            "\tif (0)\n"
            "\t\tint3_selftest();\n"
        ),
        reason="compile out int3_selftest() in alternative_instructions(): PVM cannot emulate int3 at CPL0",
    ),
    SourcePatch(
        path="arch/x86/kernel/fpu/core.c",
        old='\t\t/* Ignore delayed exceptions from user space */\n\t\tasm volatile("1: fwait\\n"\n',
        new=(
            "\t\t/* pyrovm: PVM's CPL0 emulator cannot execute fwait (an exiting task that owns the FPU\n"
            "\t\t * ended the VM with an emulation failure); user space cannot run there anyway. */\n"
            '\t\tasm volatile("1: nop\\n"\n'
        ),
        reason="fpu__drop(): PVM cannot emulate fwait at CPL0 (hit when a task that used the FPU exits)",
    ),
)


def apply_patch(tree: Path, patch: SourcePatch) -> None:
    """Apply ``patch`` in the kernel tree ``tree``; fail loudly unless its text occurs exactly once."""
    target = tree / patch.path
    try:
        content = target.read_text()
    except OSError as exc:
        raise KernelBuildError(f"patch target {target} cannot be read: {exc}") from exc
    count = content.count(patch.old)
    if count != 1:
        raise KernelBuildError(
            f"patch for {patch.path} does not apply: the expected text occurs {count} times (want 1); "
            f"this kernel version needs an updated patch ({patch.reason})"
        )
    target.write_text(content.replace(patch.old, patch.new))


# --------------------------------------------------------------------------------------------------
# Config fragments


def parse_config(text: str) -> dict[str, str]:
    """Parse Kconfig ``.config``/fragment text into ``{"CONFIG_X": value}``; "is not set" reads as ``"n"``."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            words = line[1:].split()
            if len(words) == 4 and words[0].startswith("CONFIG_") and words[1:] == ["is", "not", "set"]:
                options[words[0]] = "n"
            continue
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_"):
            options[name.strip()] = value.strip()
    return options


def check_config(fragment: dict[str, str], config: dict[str, str]) -> list[str]:
    """Return one line per fragment option that did not land in ``config`` (empty list: all did)."""
    missing: list[str] = []
    for name, want in fragment.items():
        have = config.get(name, "n")
        if have != want:
            shown = "not set" if have == "n" else have
            wanted = "not set" if want == "n" else want
            missing.append(f"{name}: wanted {wanted}, got {shown}")
    return missing


def fragment_texts(pvm: bool) -> list[tuple[str, str]]:
    """The fragments for a variant, as ``(file name, text)`` in merge order."""
    paths = [FRAGMENT, PVM_FRAGMENT] if pvm else [FRAGMENT]
    return [(p.name, p.read_text()) for p in paths]


# --------------------------------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    """``$PYROVM_CACHE/kernel`` (``PYROVM_CACHE`` defaults to ``~/.cache/pyrovm``)."""
    base = os.environ.get("PYROVM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "pyrovm") / "kernel"


def cache_key(
    source_identity: str, fragments: list[tuple[str, str]], pvm: bool, patches: tuple[SourcePatch, ...]
) -> str:
    """sha256 over the source identity, the fragment texts, the variant and the patch texts."""
    h = hashlib.sha256()

    def feed(label: str, value: str) -> None:
        data = value.encode()
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    feed("recipe", RECIPE_VERSION)
    feed("source", source_identity)
    for name, text in fragments:
        feed("fragment", name)
        feed("fragment-text", text)
    feed("variant", "pvm" if pvm else "normal")
    for patch in patches:
        feed("patch", patch.text())
    return h.hexdigest()


def pvm_host() -> bool:
    """True when this host's KVM is PVM (``/sys/module/kvm_pvm`` exists)."""
    return Path("/sys/module/kvm_pvm").exists()


# --------------------------------------------------------------------------------------------------
# Host packages


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(packages: list[str], log: Progress) -> None:
    log(f"apt-get install -y {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", *packages]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0 and "Unable to locate package" in result.stderr + result.stdout:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise KernelBuildError(f"apt-get install {' '.join(packages)} failed: {' / '.join(tail)}")


def _missing_build_deps() -> list[str]:
    missing: list[str] = []
    for probe, package in _BUILD_DEPS:
        found = Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None
        if not found:
            missing.append(package)
    return missing


def _ensure_build_deps(log: Progress) -> None:
    missing = _missing_build_deps()
    if not missing:
        return
    if not _is_root() or shutil.which("apt-get") is None:
        raise KernelBuildError(
            f"kernel build tools are missing; install the Debian packages: {' '.join(missing)}"
        )
    _apt_install(missing, log)
    still = _missing_build_deps()
    if still:
        raise KernelBuildError(f"kernel build tools still missing after apt-get: {' '.join(still)}")


def _package_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    status, _, version = result.stdout.partition("\t")
    return version.strip() if status.strip() == "install ok installed" and version.strip() else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "tarball" or "tree"
    path: Path
    identity: str


def _resolve_source(source: Path | None, log: Progress) -> _Source:
    if source is None:
        if not DEFAULT_SOURCE_TARBALL.is_file():
            if not _is_root() or shutil.which("apt-get") is None:
                raise KernelBuildError(
                    f"{DEFAULT_SOURCE_TARBALL} is missing; install the Debian package "
                    f"{DEFAULT_SOURCE_PACKAGE} "
                    "(as root: apt-get install linux-source-6.1 flex bison bc libelf-dev libssl-dev) "
                    "or pass --source"
                )
            _apt_install([DEFAULT_SOURCE_PACKAGE], log)
            if not DEFAULT_SOURCE_TARBALL.is_file():
                raise KernelBuildError(
                    f"{DEFAULT_SOURCE_PACKAGE} is installed but {DEFAULT_SOURCE_TARBALL} is still missing"
                )
        version = _package_version(DEFAULT_SOURCE_PACKAGE)
        identity = (
            f"debian:{DEFAULT_SOURCE_PACKAGE}={version}"
            if version
            else f"tarball-sha256:{_sha256_file(DEFAULT_SOURCE_TARBALL)}"
        )
        return _Source("tarball", DEFAULT_SOURCE_TARBALL, identity)
    source = source.expanduser().resolve()
    if source.is_dir():
        makefile = source / "Makefile"
        if not makefile.is_file() or not (source / "arch" / "x86").is_dir():
            raise KernelBuildError(f"{source} is not a Linux kernel source tree (no Makefile or arch/x86)")
        return _Source("tree", source, f"tree:{source}:{makefile.stat().st_mtime_ns}")
    if source.is_file():
        return _Source("tarball", source, f"tarball-sha256:{_sha256_file(source)}")
    raise KernelBuildError(f"kernel source {source} does not exist")


def _find_tree(root: Path) -> Path:
    """The kernel tree inside an extracted tarball: ``root`` itself or its single top directory."""
    if (root / "Makefile").is_file() and (root / "arch").is_dir():
        return root
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / "Makefile").is_file() and (child / "arch" / "x86").is_dir():
            return child
    raise KernelBuildError("the source tarball holds no Linux kernel tree (no Makefile with arch/x86)")


# --------------------------------------------------------------------------------------------------
# Running commands


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise KernelBuildError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")
    return result.stdout


def _run_make(cmd: list[str], cwd: Path, report: Progress, interval: float) -> None:
    """Run make, forwarding its most recent output line through ``report`` every ``interval`` seconds."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    last: list[str] = [""]

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                last[0] = line
        proc.stdout.close()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    shown = ""
    while True:
        try:
            proc.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            line = last[0].strip()
            report(line if line and line != shown else f"{line or 'make running'} (still)")
            shown = line
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    thread.join()
    if proc.returncode != 0:
        errors = [ln for ln in tail if "error" in ln.lower()] or list(tail)[-15:]
        detail = "\n".join(errors[-15:])
        raise KernelBuildError(f"make failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}")


# --------------------------------------------------------------------------------------------------
# The build


CACHED_FILES = ("bzImage", "vmlinux", ".config", "System.map")


def build_kernel(
    source: Path | None = None,
    output: Path | None = None,
    pvm: bool | None = None,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    keep_build_dir: bool = False,
    report_interval: float = 15.0,
) -> Path:
    """Build (or find in the cache) the pyrovm guest kernel and return the cached ``bzImage`` path.

    ``source``: a kernel source tree or tarball (default: Debian's ``linux-source-6.1``, installed with
    apt-get when missing and running as root). ``output``: also copy the bzImage there and the vmlinux to
    ``<output>.vmlinux``. ``pvm``: build the PVM variant (``None``: when this host's KVM is PVM).
    ``jobs``: ``make -j`` (default: CPU count). ``progress``: receives ``"[  12s] step: message"`` lines.
    The ``vmlinux`` (ELF, with the PVH entry note) lies beside the returned bzImage.
    """
    start = time.monotonic()

    def log(step: str, message: str) -> None:
        if progress is not None:
            progress(f"[{time.monotonic() - start:4.0f}s] {step}: {message}")

    if pvm is None:
        pvm = pvm_host()
    if jobs is None:
        jobs = os.cpu_count() or 1
    if jobs < 1:
        raise KernelBuildError(f"jobs must be at least 1, not {jobs}")

    src = _resolve_source(source, lambda m: log("setup", m))
    fragments = fragment_texts(pvm)
    patches = PVM_PATCHES if pvm else ()
    key = cache_key(src.identity, fragments, pvm, patches)
    root = cache_root()
    final = root / key
    variant = "pvm" if pvm else "normal"

    if all((final / name).is_file() for name in CACHED_FILES):
        log("cache", f"hit {final} ({variant} variant, {src.identity})")
    else:
        log("cache", f"miss {final} ({variant} variant, {src.identity})")
        _ensure_build_deps(lambda m: log("setup", m))
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
        try:
            _build_into(src, fragments, patches, jobs, work, final, log, report_interval)
        finally:
            if keep_build_dir:
                log("cleanup", f"build tree kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    bzimage = final / "bzImage"
    if output is not None:
        output = output.expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(bzimage, output)
        _copy_atomic(final / "vmlinux", output.with_name(output.name + ".vmlinux"))
        log("output", f"copied bzImage to {output} and vmlinux to {output}.vmlinux")
    log("done", str(bzimage))
    return bzimage


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def configure(
    tree: Path, fragments: list[tuple[str, str]], scratch: Path, progress: Callable[[str], None] | None = None
) -> dict[str, str]:
    """Configure ``tree``: tinyconfig + the fragments (merge_config.sh -m) + olddefconfig, then check.

    Returns the final ``.config`` as a dict; raises :class:`KernelBuildError` listing every fragment option
    that did not land (an unmet dependency, a misspelt name, a choice that could not be taken).
    """

    def log(message: str) -> None:
        if progress is not None:
            progress(message)

    log("make tinyconfig")
    _run(["make", "tinyconfig"], tree, "make tinyconfig")
    frag_paths: list[Path] = []
    wanted: dict[str, str] = {}
    for name, text in fragments:
        path = scratch / name
        path.write_text(text)
        frag_paths.append(path)
        wanted.update(parse_config(text))
    log(f"merge {' '.join(n for n, _ in fragments)}")
    _run(
        ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config", *map(str, frag_paths)],
        tree,
        "merge_config.sh",
    )
    _run(["make", "olddefconfig"], tree, "make olddefconfig")
    config = parse_config((tree / ".config").read_text())
    missing = check_config(wanted, config)
    if missing:
        raise KernelBuildError(
            f"{len(missing)} fragment option(s) did not land in .config (unmet dependencies?): "
            + "; ".join(missing)
        )
    log(f"all {len(wanted)} fragment options present in .config")
    return config


def _build_into(
    src: _Source,
    fragments: list[tuple[str, str]],
    patches: tuple[SourcePatch, ...],
    jobs: int,
    work: Path,
    final: Path,
    log: Callable[[str, str], None],
    report_interval: float,
) -> None:
    # 1. Sources.
    if src.kind == "tarball":
        log("extract", f"{src.path} -> {work}")
        extract = work / "src"
        extract.mkdir()
        _run(["tar", "-xf", str(src.path), "-C", str(extract)], work, "extracting the kernel source")
        tree = _find_tree(extract)
    else:
        log("extract", f"copying {src.path} -> {work / 'src'}")
        tree = work / "src"
        _run(["cp", "-a", "--reflink=auto", f"{src.path}/.", str(tree)], work, "copying the kernel tree")
        _run(["make", "-s", "mrproper"], tree, "make mrproper")
    for patch in patches:
        apply_patch(tree, patch)
        log("patch", f"{patch.path}: {patch.reason}")

    # 2. Config.
    configure(tree, fragments, work, lambda m: log("config", m))

    # 3. Build.
    log("build", f"make -j{jobs} bzImage")
    _run_make(["make", f"-j{jobs}", "bzImage"], tree, lambda m: log("build", m), report_interval)
    products = {
        "bzImage": tree / "arch" / "x86" / "boot" / "bzImage",
        "vmlinux": tree / "vmlinux",
        ".config": tree / ".config",
        "System.map": tree / "System.map",
    }
    for name, path in products.items():
        if not path.is_file():
            raise KernelBuildError(f"the build finished but {name} is missing ({path})")

    # 4. Store atomically: fill a temporary directory, then rename it into place.
    staging = Path(tempfile.mkdtemp(prefix=f".store-{final.name[:12]}-", dir=final.parent))
    try:
        for name, path in products.items():
            shutil.copyfile(path, staging / name)
        (staging / "source.txt").write_text(src.identity + "\n")
        if final.exists():  # an incomplete entry (or a concurrent builder finished first)
            if all((final / name).is_file() for name in CACHED_FILES):
                log("store", f"{final} appeared meanwhile; keeping it")
                return
            shutil.rmtree(final)
        try:
            os.rename(staging, final)
        except OSError:
            if not all((final / name).is_file() for name in CACHED_FILES):
                raise
            log("store", f"{final} appeared meanwhile; keeping it")
            return
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log("store", f"{final}")


# --------------------------------------------------------------------------------------------------
# CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kernel build`` to a CLI's subparsers."""
    parser = subparsers.add_parser(
        "kernel",
        help="build the minimal guest Linux kernel",
        description="Guest kernel tooling.",
    )
    sub = parser.add_subparsers(dest="kernel_command", metavar="COMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="build (or reuse from the cache) a minimal microVM Linux kernel",
        description=(
            "Build a minimal Linux kernel for pyrovm guests: make tinyconfig + the microvm.config fragment "
            "(serial console, PVH entry, kvmclock, virtio-mmio blk/net/vsock/rng, ext4, initramfs). "
            "The result is cached in $PYROVM_CACHE/kernel/<key>/ (default ~/.cache/pyrovm) with bzImage, "
            "vmlinux, .config and System.map; a repeated build returns at once. Progress goes to stderr; "
            "the bzImage path is the last line of stdout. A build from scratch takes a few minutes."
        ),
    )
    build.add_argument(
        "--source",
        type=Path,
        metavar="PATH",
        help="kernel source tree or tarball (default: Debian's linux-source-6.1, "
        f"{DEFAULT_SOURCE_TARBALL}, installed with apt-get when missing and root)",
    )
    build.add_argument(
        "--output",
        type=Path,
        metavar="PATH",
        help="also copy the bzImage to PATH and the vmlinux to PATH.vmlinux",
    )
    build.add_argument(
        "--pvm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the PVM variant (Intel-only CPU support, int3 self-test compiled out); "
        "default: when /sys/module/kvm_pvm exists",
    )
    build.add_argument("--jobs", "-j", type=int, metavar="N", help="make -jN (default: number of CPUs)")
    build.set_defaults(func=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        path = build_kernel(
            source=args.source, output=args.output, pvm=args.pvm, jobs=args.jobs, progress=progress
        )
    except KernelBuildError as exc:
        lines = str(exc).splitlines()
        print(f"pyrovm kernel build: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pyrovm kernel build: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``kernel ...`` on its own (``python -m pyrovm.kernel.build build ...``)."""
    parser = argparse.ArgumentParser(prog="pyrovm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernel", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
