"""A real Linux kernel booted through the Firecracker-compatible API (slow: about a minute on a PVM host):
``SendCtrlAltDel`` types Ctrl-Alt-Del on the i8042 keyboard and the kernel reboots (``reboot=k``: through
the i8042's reset line, which ends the VM cleanly).  The kernel is kept alive without user space by
waiting for a root device that never comes (``root=/dev/vdz rootwait``)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyrovm.api import Client
from pyrovm.api.server import socket_answers

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = [pytest.mark.slow, needs_kvm]

BOOT_TIMEOUT = 400
KEEP_ALIVE = "console=ttyS0 reboot=k panic=-1 root=/dev/vdz rootwait"


@pytest.fixture(scope="module")
def kernel() -> Path:
    from pyrovm.kernel.build import build_kernel

    return build_kernel()


def test_send_ctrl_alt_del_reboots_linux(kernel: Path, tmp_path: Path) -> None:
    sock = tmp_path / "fc.sock"
    proc = subprocess.Popen(
        pyrovm_argv("serve", "--api-sock", str(sock), "--id", "cad"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    out = bytearray()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not socket_answers(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.02)
        with Client(str(sock)) as c:
            c.put("/machine-config", vcpu_count=1, mem_size_mib=128)
            c.put("/boot-source", kernel_image_path=str(kernel), boot_args=KEEP_ALIVE)
            c.put("/actions", action_type="InstanceStart")
            deadline = time.monotonic() + BOOT_TIMEOUT
            while b"Waiting for root device /dev/vdz" not in out:
                assert proc.poll() is None and time.monotonic() < deadline, bytes(out[-3000:]).decode()
                time.sleep(0.2)
            assert b"atkbd serio0" in out or b"input: AT" in out, bytes(out[-3000:]).decode()
            c.put("/actions", action_type="SendCtrlAltDel")
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    text = bytes(out).decode(errors="replace")
    assert "reboot: Restarting system" in text, text[-3000:]
    assert status == 0, (status, proc.stderr.read().decode() if proc.stderr else "")  # the guest reset
