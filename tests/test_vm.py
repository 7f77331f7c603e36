"""End to end: the test guest (and hand-assembled guests) under pyrovm's VM class."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from pyrovm import kvm
from pyrovm.loader import KernelLoadError
from pyrovm.vmm import VM, ConfigError, ExitCode, ExitReason

import rawelf
from conftest import needs_kvm

pytestmark = needs_kvm


@pytest.mark.parametrize("boot", ["pvh", "linux64"])
def test_hello(guest: Path, boot: str) -> None:
    with VM(guest, memory="32M", cmdline="test=hello", boot=boot) as vm:
        result = vm.wait(20)
    assert vm.boot_mode == boot
    assert vm.console.text == "hello from the test guest\n"
    assert result.reason is ExitReason.EXIT_PORT
    assert result.guest_status == 0
    assert result.exit_code == 1  # (0 << 1) | 1, as QEMU's isa-debug-exit


def test_polled_console_writes_are_coalesced(guest: Path) -> None:
    """KVM queues the UART's THR writes while its interrupt is off: one exit per byte (the LSR read, which
    first serves the bytes before it) instead of two, and the same output."""
    counts = {}
    for coalesced in (True, False):
        with VM(guest, memory="32M", cmdline="test=hello", coalesced_io=coalesced) as vm:
            result = vm.wait(20)
            assert vm.console.text == "hello from the test guest\n" and result.guest_status == 0
            counts[coalesced] = vm.exit_counts()
    text = len("hello from the test guest\n")
    assert counts[True]["coalesced"] == text and counts[False]["coalesced"] == 0
    assert counts[False]["io"] - counts[True]["io"] == text


def test_a_quiet_guest_s_last_coalesced_bytes_come_out(guest: Path) -> None:
    """The guest prints a line, then computes for seconds without touching a device: its newline, queued
    by KVM, is served by the vCPU monitor within DRAIN_INTERVAL, not at the guest's next exit."""
    with VM(guest, memory="32M", cmdline="test=count delay=40000000000 max=2") as vm:
        assert vm.console.wait_for("count 1\n", timeout=5) is not None, vm.console.text
        assert vm.exit_counts()["coalesced"] == len("count 1\n")
        vm.stop()


@pytest.mark.parametrize("status", [0, 3, 42, 127])
def test_exit_status_propagates(guest: Path, status: int) -> None:
    with VM(guest, memory="32M", cmdline=f"test=exit status={status}") as vm:
        result = vm.wait(20)
    assert f"exit status {status}" in vm.console.text
    assert result.guest_status == status
    assert result.exit_code == ((status << 1) | 1) & 0xFF


@pytest.mark.parametrize("cpus", [1, 4])
def test_every_vcpu_reports_its_apic_id(guest: Path, cpus: int) -> None:
    with VM(guest, memory="32M", cpus=cpus, cmdline=f"test=cpus ncpus={cpus}") as vm:
        result = vm.wait(30)
    assert result.reason is ExitReason.EXIT_PORT and result.guest_status == 0, vm.console.text
    ids = sorted(int(m) for m in re.findall(r"cpu \d+ apic-id (\d+)", vm.console.text))
    assert ids == list(range(cpus))
    assert f"cpus: {cpus}" in vm.console.text


@pytest.mark.parametrize("kind", ["pio", "mmio"])
def test_unclaimed_exits_counted(guest: Path, kind: str) -> None:
    with VM(guest, memory="32M", cmdline=f"test={kind} count=500") as vm:
        result = vm.wait(30)
        bus = vm.pio_bus if kind == "pio" else vm.mmio_bus
    assert f"{kind} done 500" in vm.console.text
    assert result.guest_status == 0
    assert bus.stats.unclaimed_writes == 500
    assert vm.exit_counts()["io" if kind == "pio" else "mmio"] >= 500


def test_triple_fault_reported_with_registers(guest: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=triple-fault") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.TRIPLE_FAULT
    assert result.exit_code == ExitCode.CRASH
    assert result.registers is not None and "rip" in result.registers
    assert result.vcpu == 0
    assert "rip=" in result.describe()


def test_internal_error_reported_with_rip(tmp_path: Path) -> None:
    # mov rax, 0xc0001000 ; jmp rax -- executing from an address no memory backs
    code = b"\x48\xb8" + (0xC0001000).to_bytes(8, "little") + b"\xff\xe0"
    elf = rawelf.make_elf(code, tmp_path / "jump.elf")
    with VM(elf, memory="16M", cmdline="") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.INTERNAL_ERROR
    assert result.exit_code == ExitCode.CRASH
    assert result.registers is not None and result.registers["rip"] == 0xC0001000
    assert "emulation failure" in result.message
    assert "rip=0x00000000c0001000" in result.describe()


def test_internal_error_shows_code_bytes(tmp_path: Path) -> None:
    # A triple fault from ud2 at CPL0 shows the bytes at RIP.
    elf = rawelf.make_elf(rawelf.UD2, tmp_path / "ud2.elf")
    with VM(elf, memory="16M") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.TRIPLE_FAULT
    assert result.code_bytes is not None and result.code_bytes.startswith(b"\x0f\x0b")


def test_halted_with_interrupts_disabled_ends_vm(tmp_path: Path) -> None:
    elf = rawelf.make_elf(rawelf.out8(0x3F8, ord("z")) + rawelf.CLI + rawelf.HLT, tmp_path / "halt.elf")
    with VM(elf, memory="16M") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.HALTED
    assert result.exit_code == 0
    assert vm.console.text == "z"


@pytest.mark.parametrize("cpus", [1, 4])
def test_stop_ends_a_spinning_guest_within_a_second(guest: Path, cpus: int) -> None:
    vm = VM(guest, memory="32M", cpus=cpus, cmdline="test=spin")
    vm.start()
    time.sleep(0.3)
    assert vm.running
    t0 = time.monotonic()
    result = vm.stop()
    elapsed = time.monotonic() - t0
    vm.close()
    assert result.reason is ExitReason.STOPPED
    assert elapsed < 1.0
    assert not vm.machine.vcpu_threads.alive()


def test_stop_from_another_thread(guest: Path) -> None:
    vm = VM(guest, memory="32M", cmdline="test=spin").start()
    threading.Timer(0.2, vm.stop).start()
    result = vm.wait(5)
    vm.close()
    assert result.reason is ExitReason.STOPPED


def test_wait_timeout_stops_the_guest(guest: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=spin") as vm:
        result = vm.wait(0.3)
    assert result.reason is ExitReason.TIMEOUT
    assert result.exit_code == ExitCode.TIMEOUT


def test_console_wait_for_and_stream(guest: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=hello") as vm:
        assert vm.console.wait_for("from the test", timeout=10) is not None
        chunks = b"".join(vm.console.stream(timeout=10))
        vm.wait(10)
    assert chunks == b"hello from the test guest\n"
    assert vm.console.wait_for("never printed", timeout=0.1) is None


def test_console_to_file(guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "console.log"
    with VM(guest, memory="32M", cmdline="test=hello", console=f"file:{out}") as vm:
        vm.wait(10)
    assert out.read_text() == "hello from the test guest\n"


def test_two_vms_at_once(guest: Path) -> None:
    a = VM(guest, memory="32M", cmdline="test=exit status=1").start()
    b = VM(guest, memory="32M", cmdline="test=exit status=2").start()
    ra, rb = a.wait(20), b.wait(20)
    a.close()
    b.close()
    assert (ra.guest_status, rb.guest_status) == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel": "/nonexistent/kernel"}, ConfigError, "no such file"),
        ({"kernel": "/"}, ConfigError, "not a regular file"),
        ({"memory": "1M"}, ConfigError, "too small"),
        ({"memory": "64T"}, ConfigError, "more than this host has"),
        ({"memory": "lots"}, ConfigError, "not a size"),
        ({"cpus": 0}, ConfigError, "at least 1"),
        ({"cpus": 5000}, ConfigError, "at most"),
        ({"initrd": "/nonexistent/initrd"}, ConfigError, "initrd"),
        ({"boot": "bios"}, ConfigError, "boot mode"),
        ({"console": "tcp:1234"}, ConfigError, "console"),
    ],
)
def test_bad_input(guest: Path, kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args: dict[str, object] = {"kernel": guest, "memory": "32M"} | kwargs
    with pytest.raises(error, match=match):
        VM(**args)  # type: ignore[arg-type]


def test_not_a_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a kernel" * 100)
    with pytest.raises(KernelLoadError, match="not a kernel"):
        VM(junk, memory="16M")
    truncated = tmp_path / "trunc.elf"
    rawelf.make_elf(b"\x90" * 64, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(KernelLoadError, match="truncated"):
        VM(truncated, memory="16M")


def test_kernel_too_big_for_memory(tmp_path: Path) -> None:
    elf = rawelf.make_elf(b"\x90", tmp_path / "high.elf", load_addr=0x2000000)
    with pytest.raises(KernelLoadError, match="does not fit"):
        VM(elf, memory="16M")


def test_kvm_device_missing_or_not_kvm(guest: Path) -> None:
    with pytest.raises(kvm.KvmUnavailable, match="does not exist"):
        VM(guest, memory="16M", kvm_path="/nonexistent/kvm")
    with pytest.raises(kvm.KvmUnavailable, match="not a KVM device"):
        VM(guest, memory="16M", kvm_path="/dev/null")


def test_kvm_device_not_writable(guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(kvm.KvmUnavailable, match="kvm' group"):
        kvm.Kvm("/dev/kvm")


def test_memory_above_the_device_hole(guest: Path) -> None:
    """5 GiB: 3 GiB below the hole and 2 GiB from 4 GiB up, two KVM memory slots (mapped lazily)."""
    with VM(guest, memory="5G", cmdline="test=hello") as vm:
        result = vm.wait(30)
        regions = [(r.guest_addr, r.size) for r in vm.memory.regions]
    assert regions == [(0, 3 << 30), (4 << 30, 2 << 30)]
    assert result.guest_status == 0 and "hello" in vm.console.text
