"""pyrovm run and disk create under hostile use: signals at any moment, outputs that name inputs, extreme
values, files that are not kernels, a pyrovm bug.  Each bad input gets one line and status 2 (8 for
pyrovm's own failures), no traceback, and leaves every input file as it was."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from conftest import SRC, cli_env, needs_kvm, pyrovm_argv

pytestmark = needs_kvm


def run(
    *args: str | bytes, timeout: float = 60, prefix: Sequence[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = list(prefix) if prefix is not None else pyrovm_argv()
    return subprocess.run(
        [*argv, *args], capture_output=True, timeout=timeout, env=cli_env(), stdin=subprocess.DEVNULL
    )


_LIVE: list[subprocess.Popen[bytes]] = []


def _spawn(kernel: Path, cmdline: str, *args: str) -> subprocess.Popen[bytes]:
    """``pyrovm run`` in the background, console off, stderr kept; killed at the end of the test if it is
    still there."""
    argv = pyrovm_argv("run", "--kernel", str(kernel), "--cmdline", cmdline, "--console", "none", *args)
    proc = subprocess.Popen(
        argv, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _LIVE.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    yield
    while _LIVE:
        proc = _LIVE.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _digest(paths: Sequence[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _one_line_error(p: subprocess.CompletedProcess[bytes], status: int, words: str) -> None:
    err = p.stderr.decode(errors="replace")
    assert p.returncode == status, (p.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pyrovm") and words in lines[0], err


@pytest.fixture
def files(tmp_path: Path, guest: Path) -> Iterator[dict[str, Path]]:
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(guest.read_bytes())
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(os.urandom(4096))
    link = tmp_path / "link-to-kernel"
    link.symlink_to(kernel)
    yield {"kernel": kernel, "img": img, "initrd": initrd, "link": link, "dir": tmp_path}


# -- outputs that are also inputs -------------------------------------------------------------------------
OUTPUT_CLASHES = [
    (["--console", "file:{img}", "--disk", "{img},ro"], "disk"),
    (["--console", "file:{img}", "--rootfs", "{img}"], "disk"),
    (["--metrics", "{img}", "--disk", "{img}"], "disk"),
    (["--console", "file:{kernel}"], "kernel"),
    (["--metrics", "{kernel}"], "kernel"),
    (["--console", "file:{link}"], "kernel"),
    (["--metrics", "{link}"], "kernel"),
    (["--console", "file:{initrd}", "--initrd", "{initrd}"], "initrd"),
    (["--console", "file:{dir}/out", "--metrics", "{dir}/out"], "metrics file"),
    (["--metrics", "{dir}/../{dir.name}/disk.img", "--disk", "{img}"], "disk"),
]


@pytest.mark.parametrize(("args", "other"), OUTPUT_CLASHES)
def test_output_path_naming_an_input_is_refused(files: dict[str, Path], args: list[str], other: str) -> None:
    before = _digest([files["kernel"], files["img"], files["initrd"]])
    argv = [a.format(**files) for a in args]
    p = run("run", "--kernel", str(files["kernel"]), "--cmdline", "test=hello", *argv)
    _one_line_error(p, 2, f"also the {other}")
    assert _digest([files["kernel"], files["img"], files["initrd"]]) == before
    assert not (files["dir"] / "out").exists()


# -- extreme and odd values --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout", "-1"], "timeout"),
        (["--timeout", "nan"], "timeout"),
        (["--timeout=-inf"], "timeout"),
        (["--cmdline", "x" * 70000], "command line"),
        (["--cmdline", 'test="hello'], "quote"),
        (["--memory", "0"], "too small"),
        (["--memory", "99999999999T"], "more than this host has"),
        (["--cpus", "0"], "at least 1"),
        (["--metrics", "/nonexistent-dir/m.json"], "does not exist"),
        (["--metrics", "/tmp"], "is a directory"),
        (["--console", "file:/nonexistent-dir/c.log"], "does not exist"),
        (["--boot-marker", "(unclosed"], "regular expression"),
        (["--disk", "{img},bogus"], "unknown option"),
        (["--disk", "{img}", "--disk", "{img}"], "given twice"),
        (["--rng-rate", "0"], "rng rate"),
    ],
)
def test_bad_values(files: dict[str, Path], args: list[str], words: str) -> None:
    before = _digest([files["kernel"], files["img"]])
    p = run(
        "run", "--kernel", str(files["kernel"]), "--cmdline", "test=hello", *[a.format(**files) for a in args]
    )
    _one_line_error(p, 2, words)
    assert _digest([files["kernel"], files["img"]]) == before
    assert sorted(x.name for x in files["dir"].iterdir()) == [
        "disk.img",
        "initrd.cpio",
        "kernel.elf",
        "link-to-kernel",
    ]


@pytest.mark.parametrize("value", ["inf", "1e300", "1e20"])
def test_huge_timeout_means_no_limit(files: dict[str, Path], value: str) -> None:
    p = run("run", "--kernel", str(files["kernel"]), "--cmdline", "test=hello", "--timeout", value)
    assert p.returncode == 1, p.stderr
    assert p.stdout == b"hello from the test guest\n"


@pytest.mark.parametrize("option", ["--cmdline", "--boot-marker"])
def test_bytes_that_are_not_utf8(files: dict[str, Path], option: str) -> None:
    p = run("run", "--kernel", str(files["kernel"]), option, b"test=hello \xff\xfe")
    _one_line_error(p, 2, "UTF-8")


def test_sparse_64g_kernel_and_initrd_refused_without_reading_them(files: dict[str, Path]) -> None:
    big = files["dir"] / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 30)
    t0 = time.monotonic()
    p = run("run", "--kernel", str(big), "--memory", "128M")
    _one_line_error(p, 2, "more than the guest's memory")
    p = run("run", "--kernel", str(files["kernel"]), "--initrd", str(big), "--memory", "128M")
    _one_line_error(p, 2, "more than the guest's memory")
    assert time.monotonic() - t0 < 20
    assert big.stat().st_blocks == 0  # still sparse: nothing written


@pytest.mark.parametrize("program", ["/bin/true", "/bin/busybox", "/usr/bin/env"])
def test_user_programs_are_not_kernels(program: str) -> None:
    if not Path(program).exists():
        pytest.skip(f"{program} is not installed")
    p = run("run", "--kernel", program, "--timeout", "10")
    _one_line_error(p, 2, "not a kernel")


# -- disk create ---------------------------------------------------------------------------------------------
def test_disk_create_force_refuses_an_image_in_use(files: dict[str, Path]) -> None:
    img = files["img"]
    before = _digest([img])
    vm = _spawn(files["kernel"], "test=spin", "--disk", str(img), "--timeout", "30")
    try:
        _wait_for_lock(img, vm)
        p = run("disk", "create", str(img), "--size", "4M", "--force")
        _one_line_error(p, 2, "in use")
        assert _digest([img]) == before
    finally:
        vm.send_signal(signal.SIGTERM)
        vm.wait(20)
    assert vm.returncode == 128 + signal.SIGTERM
    assert sorted(x.name for x in files["dir"].iterdir()) == [
        "disk.img",
        "initrd.cpio",
        "kernel.elf",
        "link-to-kernel",
    ]


def _wait_for_lock(img: Path, proc: subprocess.Popen[bytes]) -> None:
    import fcntl

    for _ in range(200):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with open(img, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                return
        time.sleep(0.05)
    raise AssertionError("the VM never locked its disk")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--size", "100P"], "size"),
        (["--size", "20T"], "cannot make a file"),
        (["--size", "4M", "--label", b"\xff\xfe"], "UTF-8"),
        (["--size", "4M", "--label", "a-label-that-is-too-long"], "longer than 16"),
        (["--size", "4M", "--from-dir", "/nonexistent"], "no such directory"),
    ],
)
def test_disk_create_bad_input_leaves_nothing(tmp_path: Path, args: list[str | bytes], words: str) -> None:
    p = run("disk", "create", str(tmp_path / "new.img"), *args)
    assert p.returncode == 2, p.stderr
    err = p.stderr.decode(errors="replace")
    assert words in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_disk_create_force_failure_keeps_the_old_image(tmp_path: Path) -> None:
    img = tmp_path / "old.img"
    img.write_bytes(os.urandom(1 << 20))
    before = _digest([img])
    p = run("disk", "create", str(img), "--size", "20T", "--force")
    assert p.returncode == 2, p.stderr
    assert _digest([img]) == before
    assert [x.name for x in tmp_path.iterdir()] == ["old.img"]


# -- signals -------------------------------------------------------------------------------------------------
def _caught(pid: int, *sigs: int) -> bool:
    """True once the process has handlers for every signal in *sigs* (SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return all(mask >> (s - 1) & 1 for s in sigs)


def _spin(files: dict[str, Path], metrics: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = _spawn(files["kernel"], "test=spin", "--metrics", str(metrics), "--timeout", "60", *extra)
    deadline = time.monotonic() + 20
    while not _caught(proc.pid, signal.SIGUSR1, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    return proc


def test_sigusr1_bursts_from_start_up_to_shutdown(files: dict[str, Path]) -> None:
    metrics = files["dir"] / "m.json"
    proc = _spin(files, metrics)
    for _ in range(300):  # during start-up (building the VM) and while it runs
        proc.send_signal(signal.SIGUSR1)
    for _ in range(30):
        time.sleep(0.01)
        for _ in range(20):
            proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while not metrics.exists():  # the VM is built and a snapshot written
        assert proc.poll() is None and time.monotonic() < deadline
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.05)
    assert proc.poll() is None
    live = json.loads(metrics.read_text())
    assert live["state"] in ("running", "created") and live["exit"] is None
    proc.send_signal(signal.SIGTERM)
    # Linux delivers pending signals lowest number first: had SIGHUP come while SIGTERM was still pending,
    # SIGHUP would be the first the process sees.  Let SIGTERM be taken first.
    time.sleep(0.1)
    for _ in range(200):  # a burst of everything during shutdown
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"Traceback" not in err, err
    final = json.loads(metrics.read_text())
    assert final["exit"]["reason"] == "stopped" and "SIGTERM" in final["exit"]["message"]
    assert sorted(x.name for x in files["dir"].iterdir() if "tmp" in x.name) == []


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGTERM, 143)]
)
def test_stop_signals(files: dict[str, Path], sig: int, status: int) -> None:
    metrics = files["dir"] / "m.json"
    proc = _spin(files, metrics)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert b"Traceback" not in err
    assert json.loads(metrics.read_text())["exit"]["reason"] == "stopped"


# -- pyrovm's own failures -----------------------------------------------------------------------------------
BROKEN_BUILD = (
    "import sys, pyrovm.builder as b, pyrovm.cli as c\n"
    "def broken(*a, **k): raise RuntimeError('simulated bug')\n"
    "b.build = broken\n"
    "sys.exit(c.main(sys.argv[1:]))\n"
)
BROKEN_DEVICE = (
    "import sys, pyrovm.devices.serial as s, pyrovm.cli as c\n"
    "def broken(self, offset, data): raise RuntimeError('simulated device bug')\n"
    "s.Serial.write = broken\n"
    "sys.exit(c.main(sys.argv[1:]))\n"
)


def test_a_pyrovm_bug_gives_status_8_and_one_line(files: dict[str, Path]) -> None:
    prefix = [sys.executable, "-c", BROKEN_BUILD]
    p = run("run", "--kernel", str(files["kernel"]), prefix=prefix)
    _one_line_error(p, 8, "internal error")
    assert b"simulated bug" in p.stderr
    verbose = run("run", "-v", "--kernel", str(files["kernel"]), prefix=prefix)
    assert verbose.returncode == 8 and b"Traceback" in verbose.stderr


def test_a_device_bug_on_a_vcpu_thread_gives_status_8(files: dict[str, Path]) -> None:
    p = run(
        "run",
        "--kernel",
        str(files["kernel"]),
        "--cmdline",
        "test=hello",
        prefix=[sys.executable, "-c", BROKEN_DEVICE],
    )
    assert p.returncode == 8, p.stderr
    assert b"vmm-error" in p.stderr and b"simulated device bug" in p.stderr


def test_src_is_this_checkout() -> None:
    assert (SRC / "pyrovm" / "runner.py").exists()


# -- more of each class ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["run"],
        ["run", "--kernel"],
        ["run", "--kernel", "k", "--rng-rate", "1e10"],
        ["run", "--kernel", "k", "--cpus", "two"],
        ["run", "--kernel", "k", "--timeout", "soon"],
        ["run", "--kernel", "k", "--boot", "bios"],
        ["run", "--kernel", "k", "--no-such-option"],
        ["frobnicate"],
        ["disk", "create"],
    ],
)
def test_usage_errors_are_one_line(args: list[str]) -> None:
    _one_line_error(run(*args), 2, "error:")


def test_metrics_to_a_character_device_is_written_in_place(files: dict[str, Path]) -> None:
    p = run("run", "--kernel", str(files["kernel"]), "--cmdline", "test=hello", "--metrics", "/dev/null")
    assert p.returncode == 1, p.stderr
    assert Path("/dev/null").is_char_device()


def test_fifo_outputs_are_refused_not_waited_on(files: dict[str, Path]) -> None:
    fifo = files["dir"] / "fifo"
    os.mkfifo(fifo)
    for args in (["--metrics", str(fifo)], ["--console", f"file:{fifo}"]):
        p = run("run", "--kernel", str(files["kernel"]), "--cmdline", "test=hello", *args, timeout=20)
        _one_line_error(p, 2, "not a regular file")


def test_an_elf_loading_below_1m_is_not_a_kernel(tmp_path: Path) -> None:
    import rawelf

    low = rawelf.make_elf(rawelf.out8(0xF4, 0), tmp_path / "low.elf", load_addr=0x8000)
    _one_line_error(run("run", "--kernel", str(low)), 2, "below 1 MiB")


def test_stop_signal_during_start_up_ends_at_once(files: dict[str, Path]) -> None:
    for _ in range(3):
        proc = _spawn(files["kernel"], "test=spin", "--timeout", "60")
        while not _caught(proc.pid, signal.SIGTERM):
            assert proc.poll() is None
            time.sleep(0.001)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err
        assert time.monotonic() - t0 < 10 and b"Traceback" not in err


def test_disk_create_stopped_by_a_signal_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20000):  # enough files that mkfs.ext4 -d takes a while
        (tree / f"f{i}").write_text(str(i))
    out = tmp_path / "out"
    out.mkdir()
    argv = pyrovm_argv("disk", "create", str(out / "new.img"), "--size", "512M", "--from-dir", str(tree))
    proc = subprocess.Popen(
        argv, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _LIVE.append(proc)
    while not _caught(proc.pid, signal.SIGTERM):
        assert proc.poll() is None
        time.sleep(0.001)
    deadline = time.monotonic() + 20
    while not list(out.iterdir()):  # the temporary image exists: mkfs is at work
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert b"Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("option", ["--metrics", "--console", "--disk", "--initrd", "--kernel"])
def test_a_name_too_long_is_bad_input(files: dict[str, Path], option: str) -> None:
    long = str(files["dir"] / ("n" * 300))
    value = f"file:{long}" if option == "--console" else long
    args = ["--kernel", str(files["kernel"])] if option != "--kernel" else []
    p = run("run", *args, "--cmdline", "test=hello", option, value)
    _one_line_error(p, 2, "File name too long" if option in ("--metrics", "--console") else "")


def test_disk_create_name_too_long_or_under_a_file(tmp_path: Path) -> None:
    _one_line_error(run("disk", "create", str(tmp_path / ("n" * 300)), "--size", "4M"), 2, "too long")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(run("disk", "create", str(afile / "x.img"), "--size", "4M"), 2, "no such directory")
    assert [x.name for x in tmp_path.iterdir()] == ["afile"]


def test_sigusr1_storm_through_build_and_run(files: dict[str, Path]) -> None:
    """Signals interrupt KVM's ioctls while the VM is built (EINTR): they are made again, the VM boots."""
    metrics = files["dir"] / "m.json"
    for _ in range(8):
        proc = _spawn(files["kernel"], "test=hello", "--metrics", str(metrics), "--timeout", "30")
        while not _caught(proc.pid, signal.SIGUSR1):
            assert proc.poll() is None
            time.sleep(0.0005)
        while proc.poll() is None:  # a signal every ~0.2 ms until the VM has run and pyrovm has exited
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                break
            time.sleep(0.0002)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err  # the guest's status 0: (0 << 1) | 1
        assert b"Traceback" not in err and b"refused" not in err
        assert json.loads(metrics.read_text())["exit"]["guest_status"] == 0
