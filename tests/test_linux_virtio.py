"""A real Linux kernel using pyrovm's virtio devices (slow: each boot takes about a minute on a PVM host).

On a PVM host guest user space cannot run, so these assert what the kernel itself shows and does: it
probes vda, mounts an ext4 root read-write (its superblock changes in the host file) or read-only, and
draws entropy from virtio-rng.  With no init on the root file system the kernel panics and, with
panic=-1 reboot=k, resets: the VM ends by itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pyrovm.disk import create_disk
from pyrovm.vmm import VM

from conftest import needs_kvm

pytestmark = [pytest.mark.slow, needs_kvm]

BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def kernel() -> Path:
    from pyrovm.kernel.build import build_kernel

    return build_kernel()


def superblock(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def boot(kernel: Path, **kwargs: object) -> tuple[VM, str]:
    vm = VM(kernel, memory="128M", cmdline="console=ttyS0 reboot=k panic=-1", **kwargs)  # type: ignore[arg-type]
    vm.start()
    result = vm.wait(BOOT_TIMEOUT)
    vm.close()
    text = vm.console.text
    assert result.reason.value in ("reset", "panic"), (
        f"{result.describe()}\n--- console tail ---\n{text[-3000:]}"
    )
    return vm, text


def test_root_on_virtio_blk_read_write_and_rng(kernel: Path, tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from the host\n")
    image = create_disk(tmp_path / "root.img", "64M", from_dir=content)
    before = superblock(image)
    # nine more disks put virtio-rng in the tenth slot: IRQ 16, a pin above the ISA range
    extra = []
    for i in range(9):
        extra.append(str(tmp_path / f"data{i}.img"))
        Path(extra[-1]).write_bytes(bytes(1 << 20))
    vm, text = boot(kernel, rootfs=str(image), disks=extra, rng=True)
    assert "virtio_mmio.device=4K@0xd0009000:16" in vm.cmdline
    assert re.search(r"virtio_blk virtio9: \[vdj\] 2048 512-byte logical blocks", text), text[-3000:]
    assert re.search(r"virtio_blk virtio\d+: \[vda\] 131072 512-byte logical blocks", text), text[-3000:]
    assert "EXT4-fs (vda): mounted filesystem" in text
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device", text)
    assert "readonly" not in re.search(r"VFS: Mounted root.*", text).group(0)  # type: ignore[union-attr]
    after = superblock(image)
    assert int(after["Mount count"]) == int(before["Mount count"]) + 1
    assert after["Last mount time"] != before["Last mount time"]
    rng = vm.metrics()["devices"]["virtio-rng"]  # type: ignore[index]
    # the kernel refills its entropy pool with several requests: each waits for the IRQ 16 interrupt
    assert rng["bytes_read"] > 0 and rng["requests"] >= 2 and rng["interrupts"] >= 1, rng


def test_read_only_disk_mounted_read_only(kernel: Path, tmp_path: Path) -> None:
    image = create_disk(tmp_path / "ro.img", "32M")
    data = image.read_bytes()
    vm, text = boot(kernel, rootfs=f"{image},ro")
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) readonly on device", text), text[-3000:]
    assert image.read_bytes() == data  # not one byte written
    blk = vm.metrics()["devices"]["virtio-blk:vda"]  # type: ignore[index]
    assert blk["bytes_written"] == 0 and blk["bytes_read"] > 0
