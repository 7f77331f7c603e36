"""Boot the project's Linux kernel (bzImage) with a busybox initramfs (slow: about a minute per boot on a
PVM host, where pyrovm adds its Linux workarounds; two boots in all).

On a PVM host guest user space cannot make system calls, so init dies at once and the kernel panics
(panic=-1 → reset → ExitReason.PANIC); what is checked is what the kernel prints: SMP bring-up, memory,
the CMOS RTC, the initramfs's init being started.  On a real KVM host the default init runs the
``pyrovm.cmd=`` command and powers off.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyrovm.initramfs import build_initramfs
from pyrovm.kvm import is_pvm_host
from pyrovm.vmm import VM, ExitReason

from conftest import needs_kvm

pytestmark = [pytest.mark.slow, needs_kvm]

BOOT_TIMEOUT = 300
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel() -> Path:
    from pyrovm.kernel.build import build_kernel

    return build_kernel().parent / "bzImage"


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initramfs") / "initramfs.cpio")


def _tail(text: str) -> str:
    return f"\n--- console tail ---\n{text[-4000:]}"


def _check_memory(text: str, size_mib: int) -> None:
    m = re.search(r"Memory: (\d+)K/(\d+)K available", text)
    assert m, "no Memory: line" + _tail(text)
    available, total = int(m.group(1)), int(m.group(2))
    # total = RAM in the e820 map (less the first page and the 640K-1M hole)
    assert (size_mib << 10) - 1024 <= total <= size_mib << 10, m.group(0)
    assert (size_mib << 10) * 0.7 < available <= total, m.group(0)


def test_two_cpus_512m_boot_to_init(kernel: Path, initramfs: Path) -> None:
    """2 vCPUs, 512 MiB: SMP through the MP table, memory, RTC, boot marker, init started; paused for 2 s
    in the middle of the boot (console and exits stand still) and resumed."""
    vm = VM(
        kernel,
        memory="512M",
        cpus=2,
        initrd=initramfs,
        boot_marker="Run /init as init process",
        cmdline="console=ttyS0 reboot=k panic=-1 pyrovm.cmd=echo%20hello-from-init",
    )
    try:
        vm.start()
        # paused in the middle of the boot: nothing moves; resumed: it goes on to init
        assert vm.console.wait_for("Brought up 1 node", timeout=BOOT_TIMEOUT), _tail(vm.console.text)
        vm.pause()
        frozen, exits = len(vm.console.data), vm.exit_counts()["exits"]
        time.sleep(2)
        assert (len(vm.console.data), vm.exit_counts()["exits"]) == (frozen, exits)
        vm.resume()
        result = vm.wait(BOOT_TIMEOUT)
    finally:
        vm.close()
    text = vm.console.text
    assert "Brought up 1 node, 2 CPUs" in text, _tail(text)
    assert "found SMP MP-table" in text, _tail(text)
    _check_memory(text, 512)
    assert "Run /init as init process" in text, _tail(text)
    assert vm.boot_marker_at is not None and vm.started_at is not None
    assert 0 < vm.boot_marker_at - vm.started_at < BOOT_TIMEOUT
    year = time.gmtime().tm_year
    assert re.search(rf"rtc_cmos rtc_cmos: setting system clock to {year}-", text), _tail(text)
    assert re.search(r"serial8250: ttyS0 at I/O 0x3f8 \(irq = 4", text), _tail(text)
    if is_pvm_host():
        assert vm.host_workarounds_applied
        assert result.reason is ExitReason.PANIC, result.describe() + _tail(text)
    else:
        assert "kvm-clock" in text, _tail(text)
        assert "hello-from-init" in text, _tail(text)
        assert result.reason in (ExitReason.HALTED, ExitReason.POWEROFF, ExitReason.RESET), result.describe()


def test_one_cpu_128m_init_dies_panics_cli_boot_timer(kernel: Path, tmp_path: Path) -> None:
    """1 vCPU, 128 MiB, through the CLI with --boot-timer: an init that exits makes the kernel panic, and
    pyrovm ends with status 6 (panic), the panic text in the console."""
    script = tmp_path / "init"
    script.write_text("#!/bin/sh\necho init-exiting\nexit 3\n")
    initrd = build_initramfs(tmp_path / "dying.cpio", init_script=script)
    console = tmp_path / "console.txt"
    cmd = [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "run",
        "--kernel",
        str(kernel),
        "--initrd",
        str(initrd),
        "--memory",
        "128M",
        "--cpus",
        "1",
        "--console",
        f"file:{console}",
        "--boot-timer",
        "--timeout",
        str(BOOT_TIMEOUT),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        timeout=BOOT_TIMEOUT + 60,
    )
    text = console.read_text(errors="replace")
    assert proc.returncode == 6, f"status {proc.returncode}\n{proc.stderr}" + _tail(text)
    assert "Kernel panic - not syncing" in text and "Attempted to kill init" in text, _tail(text)
    assert "Brought up 1 node, 1 CPU" in text, _tail(text)
    _check_memory(text, 128)
    m = re.search(r"boot marker after (\d+\.\d+) s: .*Run /init as init process", proc.stderr)
    assert m, proc.stderr
    assert 0 < float(m.group(1)) < BOOT_TIMEOUT
    assert "panic:" in proc.stderr


def test_snapshot_mid_boot_restored_in_another_process_boots_on(
    kernel: Path, initramfs: Path, tmp_path: Path
) -> None:
    """2 vCPUs, 256 MiB: saved part-way through the boot (after ``Unpacking initramfs``), the original
    stopped there; ``pyrovm snapshot restore`` in a new process goes on to init and its panic (on a real
    KVM host: init runs and powers off), as an uninterrupted boot does."""
    vm = VM(kernel, memory="256M", cpus=2, initrd=initramfs)
    try:
        vm.start()
        assert vm.console.wait_for("Unpacking initramfs", timeout=BOOT_TIMEOUT), _tail(vm.console.text)
        vm.pause()
        vm.snapshot(tmp_path / "boot.state", tmp_path / "boot.mem")
        before = vm.console.text
    finally:
        vm.close()
    assert "Run /init" not in before
    console = tmp_path / "console.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyrovm.cli",
            "snapshot",
            "restore",
            str(tmp_path / "boot.state"),
            "--mem",
            str(tmp_path / "boot.mem"),
            "--resume",
            "--console",
            f"file:{console}",
            "--timeout",
            str(BOOT_TIMEOUT),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        timeout=BOOT_TIMEOUT + 60,
    )
    after = console.read_text(errors="replace")
    assert "Linux version" not in after, _tail(after)  # it continued; it did not boot again
    assert "Run /init as init process" in after, proc.stderr + _tail(after)
    assert "Brought up 1 node, 2 CPUs" in before + after
    if is_pvm_host():
        assert proc.returncode == 6, f"status {proc.returncode}\n{proc.stderr}" + _tail(after)
        assert "Kernel panic - not syncing" in after, _tail(after)
    else:
        assert proc.returncode == 0, f"status {proc.returncode}\n{proc.stderr}" + _tail(after)


MILESTONES = (
    r"Brought up 1 node, 4 CPUs",
    r"virtio_blk virtio\d+: \[vda\] 131072 512-byte logical blocks",
    r"Unpacking initramfs",
    r"Run /init as init process",
)


def test_qemu_seed_command_line_reaches_the_same_milestones_as_run(
    kernel: Path, initramfs: Path, tmp_path: Path
) -> None:
    """The issue's seed QEMU command line, with real files (-m 512 instead of 8192: on a PVM host the
    kernel's memory set-up is emulated code, 8 GiB of it would take minutes), through ``pyrovm qemu``, and
    the same settings through ``pyrovm run``: the same kernel milestones, the same end."""
    from pyrovm.disk import create_disk

    disk = tmp_path / "disk.img"
    create_disk(disk, 64 << 20)
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    qemu = [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "qemu",
        "-enable-kvm",
        "-M",
        "q35",
        "-m",
        "512",
        "-cpu",
        "host,kvm=off",
        "-smp",
        "4",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 root=/dev/vda",
        "-drive",
        f"file={disk},if=virtio,format=raw",
        "-nographic",
    ]
    run = [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "run",
        "--memory",
        "512M",
        "--cpus",
        "4",
        "--kernel",
        str(kernel),
        "--initrd",
        str(initramfs),
        "--cmdline",
        "console=ttyS0 root=/dev/vda",
        "--disk",
        str(disk),
        "--timeout",
        str(BOOT_TIMEOUT),
    ]
    results = []
    for cmd in (qemu, run):
        p = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=BOOT_TIMEOUT + 60
        )
        for m in MILESTONES:
            assert re.search(m, p.stdout), f"{cmd[3]}: no {m!r}\n{p.stderr}" + _tail(p.stdout)
        results.append(p.returncode)
    assert results[0] == results[1], results  # the same end (a panic, 6, on a PVM host)
