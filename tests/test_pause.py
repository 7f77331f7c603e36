"""Pause and resume on a running test guest: its progress counter stands still while paused and moves on
after; the life-cycle rules (pause before start, after the end) raise StateError."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from pyrovm.errors import PyrovmError, StateError
from pyrovm.vmm import VM, ExitReason

from conftest import needs_kvm

pytestmark = needs_kvm


def _counter(vm: VM) -> int:
    m = vm.console.wait_for(re.compile(rb"spin counter at (0x[0-9a-f]+)"), timeout=10)
    assert m is not None, vm.console.text
    return vm.memory.read_u64(int(m.group(1), 16))


def _moves(vm: VM, pause: float = 0.2) -> bool:
    a = _counter(vm)
    time.sleep(pause)
    return _counter(vm) != a


@pytest.mark.parametrize("cpus", [1, 3])
def test_counter_stands_still_while_paused_and_moves_after(guest: Path, cpus: int) -> None:
    with VM(guest, memory="32M", cpus=cpus, cmdline="test=spin") as vm:
        assert _moves(vm)
        for _ in range(3):
            vm.pause()
            assert vm.paused and vm.state == "paused"
            assert vm.machine.vcpu_threads.paused
            frozen = _counter(vm)
            time.sleep(0.3)
            assert _counter(vm) == frozen, "the guest ran while paused"
            vm.resume()
            assert vm.state == "running"
            assert _moves(vm), "the guest did not continue after resume"
            assert _counter(vm) > frozen
        vm.pause()
        vm.pause()  # pausing twice is harmless
        vm.resume()
        vm.resume()  # so is resuming a running VM
        assert _moves(vm)
        result = vm.stop()
    assert result.reason is ExitReason.STOPPED
    assert vm.state == "stopped"


def test_stop_and_timeout_while_paused(guest: Path) -> None:
    vm = VM(guest, memory="32M", cpus=2, cmdline="test=spin").start()
    _counter(vm)
    vm.pause()
    t0 = time.monotonic()
    result = vm.wait(0.3)
    assert result.reason is ExitReason.TIMEOUT
    assert time.monotonic() - t0 < 3
    assert not vm.machine.vcpu_threads.alive()
    vm.close()


def test_exit_port_after_resume(guest: Path) -> None:
    """A guest that has work to do finishes it normally after a pause."""
    with VM(guest, memory="32M", cmdline="test=pio count=20000") as vm:
        vm.pause()
        time.sleep(0.1)
        vm.resume()
        result = vm.wait(30)
    assert result.reason is ExitReason.EXIT_PORT and result.guest_status == 0
    assert "pio done 20000" in vm.console.text


def test_life_cycle_errors(guest: Path) -> None:
    vm = VM(guest, memory="32M", cmdline="test=hello")
    with pytest.raises(StateError, match="not started"):
        vm.pause()
    with pytest.raises(StateError, match="not started"):
        vm.resume()
    with pytest.raises(StateError, match="not started"):
        vm.wait(1)
    assert vm.state == "created"
    vm.start()
    with pytest.raises(StateError, match="already started"):
        vm.start()
    vm.wait(10)
    with pytest.raises(StateError, match="has ended"):
        vm.pause()
    with pytest.raises(PyrovmError):
        vm.resume()
    vm.close()
    vm.close()  # twice is fine


def test_the_io_thread_serves_nothing_while_paused(guest: Path) -> None:
    """A queue notification that arrives while paused (here: its eventfd written by hand, as KVM would)
    is served only after resume."""
    with VM(guest, memory="32M", cmdline="test=spin", rng=True) as vm:
        _counter(vm)
        slot = vm.machine.devices.slots[0]
        stats = slot.transport.device.stats
        efd = slot.notify_fds[0][1]
        vm.pause()
        before = stats.notifications
        efd.write(1)
        time.sleep(0.3)
        assert stats.notifications == before
        vm.resume()
        deadline = time.monotonic() + 5
        while stats.notifications == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.notifications == before + 1


def test_device_states_of_a_paused_vm(guest: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=spin", rng=True) as vm:
        _counter(vm)
        vm.pause()
        states = vm.machine.devices.save_state()
        vm.resume()
    assert set(states) == {"serial", "i8042", "debug_exit", "rtc", "boot_timer", "virtio-rng"}
    assert type(states["serial"]).__name__ == "SerialState"
    assert type(states["virtio-rng"].transport).__name__ == "MmioTransportState"
    assert type(states["virtio-rng"].device).__name__ == "VirtioRngState"
