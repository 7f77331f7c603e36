"""Tests of the newc cpio writer and the busybox initramfs builder."""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyrovm import initramfs
from pyrovm.initramfs import CpioWriter, InitramfsError, build_initramfs, parse_add

# --------------------------------------------------------------------------------------------------
# A small newc reader, independent of the writer


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes
    header_offset: int


def read_newc(blob: bytes) -> list[Member]:
    members: list[Member] = []
    off = 0
    while True:
        assert off % 4 == 0, f"header at unaligned offset {off}"
        assert blob[off : off + 6] == b"070701", f"bad magic at {off}: {blob[off : off + 6]!r}"
        fields = [int(blob[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_start = off + 110
        raw_name = blob[name_start : name_start + namesize]
        assert raw_name.endswith(b"\0") and b"\0" not in raw_name[:-1]
        name = raw_name[:-1].decode()
        data_start = name_start + namesize
        padding = (-data_start) % 4
        assert blob[data_start : data_start + padding] == b"\0" * padding
        data_start += padding
        data = blob[data_start : data_start + size]
        assert len(data) == size
        end = data_start + size
        padding = (-end) % 4
        assert blob[end : end + padding] == b"\0" * padding
        members.append(Member(name, ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), data, off))
        off = end + padding
        if name == "TRAILER!!!":
            break
    assert off == len(blob), "data after the trailer"
    return members


def by_name(members: list[Member]) -> dict[str, Member]:
    return {m.name: m for m in members}


# --------------------------------------------------------------------------------------------------
# CpioWriter


def write_sample() -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_dir("/dev")
        w.add_dir("etc", 0o700)
        w.add_file("/etc/hello.txt", b"hello", 0o640)
        w.add_file("etc/empty", b"")
        w.add_file("etc/four", b"1234", 0o600)
        w.add_symlink("/etc/link", "/etc/hello.txt")
        w.add_device("/dev/console", 5, 1)
        w.add_device("/dev/vda", 254, 0, 0o660, char=False)
    return buf.getvalue()


def test_writer_entries_round_trip() -> None:
    members = read_newc(write_sample())
    names = [m.name for m in members]
    assert names == [
        "dev",
        "etc",
        "etc/hello.txt",
        "etc/empty",
        "etc/four",
        "etc/link",
        "dev/console",
        "dev/vda",
        "TRAILER!!!",
    ]
    m = by_name(members)
    assert m["dev"].mode == stat.S_IFDIR | 0o755
    assert m["etc"].mode == stat.S_IFDIR | 0o700
    assert m["etc/hello.txt"].mode == stat.S_IFREG | 0o640
    assert m["etc/hello.txt"].data == b"hello"
    assert m["etc/empty"].data == b""
    assert m["etc/four"].data == b"1234"
    assert m["etc/link"].mode == stat.S_IFLNK | 0o777
    assert m["etc/link"].data == b"/etc/hello.txt"
    assert m["dev/console"].mode == stat.S_IFCHR | 0o600
    assert m["dev/console"].rdev == (5, 1)
    assert m["dev/vda"].mode == stat.S_IFBLK | 0o660
    assert m["dev/vda"].rdev == (254, 0)
    assert all(x.mtime == 0 and x.uid == 0 and x.gid == 0 for x in members)


def test_writer_inode_numbers_unique_and_trailer() -> None:
    members = read_newc(write_sample())
    inos = [m.ino for m in members[:-1]]
    assert inos == list(range(1, len(inos) + 1))
    trailer = members[-1]
    assert trailer.name == "TRAILER!!!" and trailer.ino == 0 and trailer.data == b""


def test_writer_padding_alignment() -> None:
    blob = write_sample()
    assert len(blob) % 4 == 0
    # read_newc checks every header offset, name and data padding; check a name of each length mod 4.
    for n in range(1, 9):
        buf = io.BytesIO()
        with CpioWriter(buf) as w:
            w.add_file("x" * n, b"y" * n)
        (member, _trailer) = read_newc(buf.getvalue())
        assert member.name == "x" * n and member.data == b"y" * n


def test_writer_rejects_bad_input() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_dir("a")
    with pytest.raises(InitramfsError, match="duplicate"):
        w.add_file("/a", b"")
    with pytest.raises(InitramfsError, match=r"'\.\.'"):
        w.add_file("a/../etc/passwd", b"")
    with pytest.raises(InitramfsError, match="empty"):
        w.add_dir("/")
    with pytest.raises(InitramfsError, match="symlink target"):
        w.add_symlink("b", "")
    with pytest.raises(InitramfsError, match="end marker"):  # the kernel would stop unpacking there
        w.add_file("/TRAILER!!!", b"")
    with pytest.raises(InitramfsError, match="32 bits"):  # 9 hex digits would shift the header
        w.add_file("big-uid", b"", uid=1 << 32)
    with pytest.raises(InitramfsError, match="32 bits"):
        w.add_device("neg", -1, 0)
    with pytest.raises(InitramfsError, match="32 bits"):
        CpioWriter(io.BytesIO(), mtime=-1)
    w.close()
    with pytest.raises(InitramfsError, match="closed"):
        w.add_dir("c")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_writer_output_readable_by_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(write_sample())
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], stdin=archive.open("rb"), capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == [
        "dev",
        "etc",
        "etc/hello.txt",
        "etc/empty",
        "etc/four",
        "etc/link",
        "dev/console",
        "dev/vda",
    ]
    out = tmp_path / "out"
    out.mkdir()
    # Extract without device nodes (mknod may be refused): write a copy without them.
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_dir("etc", 0o750)
        w.add_file("etc/hello.txt", b"hello", 0o640)
        w.add_symlink("etc/link", "hello.txt")
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"], input=buf.getvalue(), cwd=out, check=True
    )
    assert (out / "etc" / "hello.txt").read_bytes() == b"hello"
    assert stat.S_IMODE((out / "etc" / "hello.txt").stat().st_mode) == 0o640
    assert (out / "etc" / "link").readlink() == Path("hello.txt")


# --------------------------------------------------------------------------------------------------
# build_initramfs with a fake busybox (no busybox needed)


@pytest.fixture
def fake_busybox(tmp_path: Path) -> Path:
    bb = tmp_path / "fake-busybox"
    bb.write_text(
        "#!/bin/sh\n[ \"$1\" = --list-full ] && printf 'bin/sh\\nsbin/poweroff\\nusr/bin/setsid\\n'\n"
    )
    bb.chmod(0o755)
    return bb


def test_build_layout(tmp_path: Path, fake_busybox: Path) -> None:
    out = build_initramfs(tmp_path / "initramfs.cpio", busybox=fake_busybox)
    assert out == tmp_path / "initramfs.cpio"
    m = by_name(read_newc(out.read_bytes()))
    for d in ("proc", "sys", "dev", "tmp", "etc", "root", "bin", "sbin", "usr", "usr/bin"):
        assert stat.S_ISDIR(m[d].mode), d
    assert m["bin/busybox"].data == fake_busybox.read_bytes()
    assert stat.S_IMODE(m["bin/busybox"].mode) == 0o755
    for applet in ("bin/sh", "sbin/poweroff", "usr/bin/setsid"):
        assert stat.S_ISLNK(m[applet].mode) and m[applet].data == b"/bin/busybox"
    assert m["dev/console"].mode == stat.S_IFCHR | 0o600 and m["dev/console"].rdev == (5, 1)
    init = m["init"]
    assert init.mode == stat.S_IFREG | 0o755
    text = init.data.decode()
    assert text.startswith("#!/bin/sh\n")
    for piece in (
        "mount -t proc",
        "mount -t sysfs",
        "mount -t devtmpfs",
        "pyrovm-init: ready",
        "pyrovm.cmd=",
        "setsid cttyhack sh",
        "pyrovm-init: exit $code",
        "poweroff -f",
    ):
        assert piece in text, piece


def test_build_sorted_parents_first_and_deterministic(tmp_path: Path, fake_busybox: Path) -> None:
    a = build_initramfs(tmp_path / "a.cpio", busybox=fake_busybox).read_bytes()
    b = build_initramfs(tmp_path / "b.cpio", busybox=fake_busybox).read_bytes()
    assert a == b
    names = [x.name for x in read_newc(a)][:-1]
    seen: set[str] = set()
    for name in names:
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, f"{name} before its directory"
        seen.add(name)


def test_build_adds_files_dirs_symlinks(tmp_path: Path, fake_busybox: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.sh").write_text("echo a\n")
    (src / "a.sh").chmod(0o751)
    (src / "sub" / "b.bin").write_bytes(bytes(range(7)))
    (src / "ln").symlink_to("a.sh")
    single = tmp_path / "single.txt"
    single.write_text("one\n")
    out = build_initramfs(
        tmp_path / "i.cpio", [(src, "/opt/tree"), (single, "/etc/single.txt")], busybox=fake_busybox
    )
    m = by_name(read_newc(out.read_bytes()))
    assert stat.S_ISDIR(m["opt"].mode) and stat.S_ISDIR(m["opt/tree/sub"].mode)
    assert m["opt/tree/a.sh"].data == b"echo a\n" and stat.S_IMODE(m["opt/tree/a.sh"].mode) == 0o751
    assert m["opt/tree/sub/b.bin"].data == bytes(range(7))
    assert stat.S_ISLNK(m["opt/tree/ln"].mode) and m["opt/tree/ln"].data == b"a.sh"
    assert m["etc/single.txt"].data == b"one\n"


def test_build_add_directory_at_root(tmp_path: Path, fake_busybox: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hi\n")
    (root / "init").write_text("#!/bin/sh\necho overlay\n")
    (root / "init").chmod(0o755)
    out = build_initramfs(tmp_path / "i.cpio", [(root, "/")], busybox=fake_busybox)
    m = by_name(read_newc(out.read_bytes()))
    assert m["etc/motd"].data == b"hi\n"
    assert m["init"].data == b"#!/bin/sh\necho overlay\n"  # adds win over the default entries
    assert stat.S_ISDIR(m["proc"].mode) and "rootfs" not in m
    with pytest.raises(InitramfsError, match="only a directory"):
        build_initramfs(tmp_path / "j.cpio", [(root / "etc" / "motd", "/")], busybox=fake_busybox)


def test_build_custom_init_and_gzip(tmp_path: Path, fake_busybox: Path) -> None:
    script = tmp_path / "my-init"
    script.write_text("#!/bin/sh\necho custom\n")
    script.chmod(0o600)
    out = build_initramfs(tmp_path / "i.cpio.gz", init_script=script, busybox=fake_busybox, compress=True)
    blob = gzip.decompress(out.read_bytes())
    m = by_name(read_newc(blob))
    assert m["init"].data == b"#!/bin/sh\necho custom\n"
    assert m["init"].mode == stat.S_IFREG | 0o755
    assert "bin/sh" in m


def test_build_bad_inputs(tmp_path: Path, fake_busybox: Path) -> None:
    with pytest.raises(InitramfsError, match="does not exist"):
        build_initramfs(tmp_path / "i.cpio", [(tmp_path / "missing", "/x")], busybox=fake_busybox)
    with pytest.raises(InitramfsError, match="init script"):
        build_initramfs(tmp_path / "i.cpio", init_script=tmp_path / "nope", busybox=fake_busybox)
    with pytest.raises(InitramfsError, match="busybox"):
        build_initramfs(tmp_path / "i.cpio", busybox=tmp_path / "no-busybox")
    assert not (tmp_path / "i.cpio").exists()


def test_parse_add() -> None:
    assert parse_add("/host/file:/guest/file") == (Path("/host/file"), "/guest/file")
    assert parse_add("rel/dir:/opt") == (Path("rel/dir"), "/opt")
    assert parse_add("/a:b:/c") == (Path("/a:b"), "/c")
    assert parse_add("rootfs:/") == (Path("rootfs"), "/")
    for bad in ("nocolon", ":/guest", "/host:", "/host:relative", "/host:/a/../b", "/ho\0st:/x"):
        with pytest.raises(InitramfsError, match="bad"):
            parse_add(bad)


# --------------------------------------------------------------------------------------------------
# CLI


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovm")
    initramfs.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_build(
    tmp_path: Path, fake_busybox: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "extra.txt"
    extra.write_text("x")
    args = make_parser().parse_args(
        ["initramfs", "build", "--busybox", str(fake_busybox), "--add", f"{extra}:/root/extra.txt"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "initramfs.cpio"
    m = by_name(read_newc((tmp_path / "initramfs.cpio").read_bytes()))
    assert m["root/extra.txt"].data == b"x"


def test_cli_bad_add(tmp_path: Path, fake_busybox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = make_parser().parse_args(
        [
            "initramfs",
            "build",
            "--busybox",
            str(fake_busybox),
            "--output",
            str(tmp_path / "i.cpio"),
            "--add",
            "no-colon",
        ]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HOST_PATH:GUEST_PATH" in err[0]
    args = make_parser().parse_args(
        [
            "initramfs",
            "build",
            "--busybox",
            str(fake_busybox),
            "--output",
            str(tmp_path / "i.cpio"),
            "--add",
            f"{tmp_path / 'missing'}:/x",
        ]
    )
    assert args.func(args) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# With the real busybox-static


@pytest.mark.skipif(
    not (Path("/bin/busybox").is_file() and initramfs._is_static(Path("/bin/busybox"))),
    reason="no static /bin/busybox (Debian busybox-static)",
)
def test_real_busybox_and_default_init_syntax(tmp_path: Path) -> None:
    out = build_initramfs(tmp_path / "i.cpio")
    m = by_name(read_newc(out.read_bytes()))
    for applet in ("bin/sh", "sbin/poweroff", "usr/bin/setsid", "bin/cttyhack", "bin/mount"):
        assert m[applet].data == b"/bin/busybox", applet
    subprocess.run(["/bin/busybox", "sh", "-n", "-c", initramfs.DEFAULT_INIT], check=True)


@pytest.mark.skipif(
    shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
    reason="no busybox to run the init's decoding",
)
def test_default_init_decodes_percent_escapes() -> None:
    """The /init's pyrovm.cmd decoding (the two lines after 'if [ -n "$cmd" ]'), run in busybox sh."""
    lines = initramfs.DEFAULT_INIT.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == 'if [ -n "$cmd" ]; then')
    decode = "\n".join(ln.strip() for ln in lines[start + 1 : start + 3])
    bb = "/bin/busybox" if Path("/bin/busybox").exists() else str(shutil.which("busybox"))
    script = f'cmd="$1"\n{decode}\nprintf "%s" "$cmd"'
    result = subprocess.run(
        [bb, "sh", "-c", script, "sh", r"echo%20a%25b%27c%27\n"], capture_output=True, text=True, check=True
    )
    assert result.stdout == "echo a%b'c'\\n"


# --------------------------------------------------------------------------------------------------
# End to end: the project's kernel + this initramfs under QEMU with TCG (full user space, any host)


def _boot_tcg(kernel: Path, initrd: Path, cmdline: str, timeout: float = 240.0) -> tuple[str, bool]:
    """Boot under QEMU TCG; return (console output, whether the guest powered off by itself)."""
    import selectors
    import time

    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    cmd = [
        qemu,
        "-M",
        "microvm,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64,vendor=GenuineIntel",
        "-m",
        "128M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1.0):
                chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                out += chunk
                # No power-off device on microvm without ACPI: the kernel halts after "Power down".
                if b"reboot: Power down" in out or b"System halted" in out:
                    return out.decode(errors="replace"), True
        return out.decode(errors="replace"), False
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="QEMU (qemu-system-x86) is not installed"
)
@pytest.mark.skipif(
    not (Path("/bin/busybox").is_file() and initramfs._is_static(Path("/bin/busybox"))),
    reason="no static /bin/busybox (Debian busybox-static)",
)
def test_default_init_boots_under_qemu_tcg(tmp_path: Path) -> None:
    from pyrovm.kernel import build as kb

    if not kb.DEFAULT_SOURCE_TARBALL.is_file() and not kb._is_root():
        pytest.skip("no kernel source to build the guest kernel")
    bzimage = kb.build_kernel()  # cached after the first build
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "hello.sh").write_text('#!/bin/sh\necho "hello from $(uname -s) $1"\nexit 3\n')
    (payload / "hello.sh").chmod(0o755)
    initrd = build_initramfs(tmp_path / "initramfs.cpio", [(payload, "/opt")])
    console, powered_off = _boot_tcg(
        bzimage, initrd, "console=ttyS0 panic=-1 pyrovm.cmd=/opt/hello.sh%20%22a%20b%22"
    )
    assert "pyrovm-init: ready" in console, console[-3000:]
    assert "hello from Linux a b" in console, console[-3000:]
    assert "pyrovm-init: exit 3" in console, console[-3000:]
    assert powered_off, console[-3000:]
