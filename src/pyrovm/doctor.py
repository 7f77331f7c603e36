"""``pyrovm doctor``: can this host run VMs, and how fast is a VM exit here?"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import kvm as k

PIO_EXITS = 5000


def _line(ok: bool | None, text: str) -> None:
    mark = {True: " ok ", False: "FAIL", None: "info"}[ok]
    print(f"[{mark}] {text}", flush=True)


def virtualization_kind() -> str:
    """How this host's KVM runs guests: PVM, Intel VT-x, AMD-V, or unknown."""
    if k.is_pvm_host():
        return "PVM (no VT-x/AMD-V: guest kernel code is emulated, guest user space cannot make system calls)"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    if " vmx" in flags:
        return "hardware (Intel VT-x)"
    if " svm" in flags:
        return "hardware (AMD-V)"
    return "unknown (no vmx/svm CPU flag, no kvm_pvm module)"


def run_doctor(kvm_path: str | None = None) -> int:
    """Print one line per check; 0 only when a VM really ran."""
    kvm_path = kvm_path or os.environ.get("PYROVM_KVM_DEVICE") or "/dev/kvm"
    path = Path(kvm_path)
    if not path.exists():
        _line(False, f"{kvm_path} does not exist: load kvm_intel/kvm_amd or enable nested virtualization")
        return 1
    if not os.access(path, os.R_OK | os.W_OK):
        _line(False, f"{kvm_path} is not readable and writable by this user: add it to the 'kvm' group")
        return 1
    _line(True, f"{kvm_path} is present and writable")
    try:
        kvm = k.Kvm(kvm_path)
    except k.KvmUnavailable as exc:
        _line(False, str(exc))
        return 1
    _line(True, f"KVM API version {kvm.api_version}")
    missing = kvm.missing_capabilities()
    if missing:
        _line(False, f"missing KVM capabilities: {', '.join(missing)}")
        return 1
    _line(
        True,
        f"capabilities present ({len(k.constants.REQUIRED_CAPS)} checked); up to {kvm.max_vcpus()} vCPUs",
    )
    coalesced = kvm.check_extension(k.constants.KVM_CAP_COALESCED_PIO) > 0
    _line(
        None, "coalesced port I/O: " + ("yes (polled console output: one exit a byte)" if coalesced else "no")
    )
    kvm.close()
    _line(None, f"virtualization: {virtualization_kind()}")

    from . import testguest
    from .vmm import VM, ExitReason

    try:
        guest = testguest.build()
    except RuntimeError as exc:
        _line(False, f"cannot build the test guest: {exc}")
        return 1
    t0 = time.monotonic()
    with VM(guest, memory="32M", cmdline="test=hello") as vm:
        result = vm.wait(10)
    boot_ms = (time.monotonic() - t0) * 1000
    if result.reason is not ExitReason.EXIT_PORT or "hello from the test guest" not in vm.console.text:
        _line(False, f"the test guest did not run: {result.describe()}")
        return 1
    _line(True, f"booted the test guest: it said hello and exited in {boot_ms:.1f} ms (VM creation included)")
    with VM(guest, memory="32M", cmdline=f"test=pio count={PIO_EXITS}") as vm:
        t0 = time.monotonic()
        result = vm.wait(30)
        elapsed = time.monotonic() - t0
    if result.reason is not ExitReason.EXIT_PORT or result.guest_status != 0:
        _line(False, f"the exit benchmark failed: {result.describe()}")
        return 1
    _line(True, f"port I/O exit round trip: {elapsed / PIO_EXITS * 1e6:.1f} µs ({PIO_EXITS} exits)")
    _network_lines()
    return 0


def _network_lines() -> None:
    """What --net can use here (information only: a VM without a NIC needs neither)."""
    import shutil

    tun = Path("/dev/net/tun")
    if tun.exists():
        _line(None, "--net tap: /dev/net/tun is present")
    else:
        _line(None, "--net tap: /dev/net/tun is missing (modprobe tun)")
    passt = shutil.which("passt")
    _line(
        None,
        f"--net user: passt at {passt}"
        if passt
        else "--net user: passt is not installed (apt-get install passt)",
    )
