"""Write the hand-made seeds of ``fuzz/corpus/`` (the targets whose input is a file format: HTTP requests,
Firecracker config files, state files, kernels, QEMU command lines).  The seeds of the structured targets
(whose input the harness reads with atheris' FuzzedDataProvider) are inputs the fuzzer found, minimised
with ``-merge=1``; files named ``crash-*`` are inputs that once crashed a harness (the tests replay them).

    python fuzz/seeds.py        # (re)writes the hand-made seeds; the others are left alone
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

CORPUS = Path(__file__).resolve().parent / "corpus"
F = _common.FILES


def http(method: str, path: str, body: object = None, extra: str = "") -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


def api_http() -> dict[str, bytes]:
    boot = {"kernel_image_path": f"{F}/vmlinux", "boot_args": "console=ttyS0"}
    return {
        "get-root": http("GET", "/"),
        "get-machine-config-close": http("GET", "/machine-config", extra="Connection: close\r\n"),
        "put-boot-source": http("PUT", "/boot-source", boot),
        "put-machine-config": http("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
        "put-drive": http("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": f"{F}/disk.img",
                                                    "is_root_device": True, "is_read_only": False}),
        "configure-and-start": http("PUT", "/boot-source", boot)
        + http("PUT", "/actions", {"action_type": "InstanceStart"}),
        "patch-vm-before-start": http("PATCH", "/vm", {"state": "Paused"}),
        "snapshot-load": http("PUT", "/snapshot/load", {"snapshot_path": f"{F}/vm.state",
                                                        "mem_backend": {"backend_type": "File",
                                                                        "backend_path": f"{F}/vm.mem"}}),
        "bad-json": b"PUT /vsock HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":",
        "http10": b"GET /version HTTP/1.0\r\n\r\n",
        "bad-request-line": b"GARBAGE\r\n\r\n",
        "chunked": b"PUT /logger HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        # HTTP/0.9 (http.server would answer without a status line): a 400
        "http09": b"GET / HTTP/0.9\r\n\r\n",
    }  # fmt: skip


def fc_config() -> dict[str, bytes]:
    full = {
        "boot-source": {"kernel_image_path": f"{F}/vmlinux", "boot_args": "console=ttyS0 reboot=k",
                        "initrd_path": f"{F}/initrd"},
        "drives": [{"drive_id": "rootfs", "path_on_host": f"{F}/disk.img", "is_root_device": True,
                    "is_read_only": False,
                    "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}, "ops": None}}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": True},
        "network-interfaces": [
            {"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
        ],
        "vsock": {"guest_cid": 3, "uds_path": f"{F}/v.sock"},
        "entropy": {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}},
        "logger": {"log_path": f"{F}/log", "level": "Info"},
        "metrics": {"metrics_path": f"{F}/metrics"},
    }  # fmt: skip
    minimal = {"boot-source": {"kernel_image_path": f"{F}/vmlinux"}, "drives": []}
    return {
        "full.json": json.dumps(full, indent=1).encode(),
        "minimal.json": json.dumps(minimal).encode(),
        "unknown-section.json": json.dumps({**minimal, "balloon": {}}).encode(),
        "drives-not-a-list.json": json.dumps({**minimal, "drives": {"drive_id": "x"}}).encode(),
    }


def snapshot() -> dict[str, bytes]:
    from pyrovm.snapshot import fileformat

    return {
        "mode0-tiny-state-file": b"\x00" + fileformat.dumps({"a": 1}),
        "mode0-truncated": b"\x00" + fileformat.dumps({"kind": "full"})[:30],
        "mode1-json": b"\x01" + json.dumps({"kind": "full", "vcpus": [], "config": {"kernel": "k"}}).encode(),
        "mode2-structured": b"\x02" + bytes(range(64)),
    }


def _elf(phdrs: list[bytes], etype: int = 2, entry: int = 0x100000, tail: bytes = b"") -> bytes:
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9), etype, 62, 1, entry, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0,
    )  # fmt: skip
    return ehdr + b"".join(phdrs) + tail


def loader() -> dict[str, bytes]:
    code = b"\xf4" * 16  # hlt
    off = 64 + 56 * 2
    load = struct.pack("<IIQQQQQQ", 1, 5, off, 0x100000, 0x100000, len(code), 0x1000, 0x1000)
    note_desc = struct.pack("<I", 0x100000)
    note = struct.pack("<III", 4, len(note_desc), 18) + b"Xen\0" + note_desc
    pt_note = struct.pack("<IIQQQQQQ", 4, 4, off + len(code), 0, 0, len(note), len(note), 4)
    setup = bytearray(1024)  # setup_sects = 1: the boot sector and one sector of setup
    setup[0x1F1] = 1
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 1  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    setup[0x234] = 1  # relocatable
    struct.pack_into("<H", setup, 0x236, 1)  # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", setup, 0x260, 0x10000)  # init_size
    return {
        "elf-linux64": b"\x02" + _elf([load, pt_note], tail=code + note),
        "elf-pvh": b"\x01" + _elf([load, pt_note], tail=code + note),
        "elf-shared-object": b"\x00" + _elf([load], etype=3, tail=code),
        "bzimage": b"\x00" + bytes(setup) + code * 40,
        "bzimage-header-only": b"\x00" + bytes(setup[:0x268]),
    }


def qemu() -> dict[str, bytes]:
    full = [
        "-enable-kvm", "-M", "microvm,acpi=off", "-m", "512M", "-smp", "cpus=2", "-cpu", "host,kvm=off,-avx",
        "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd.img", "-append", "console=ttyS0",
        "-drive", "file=disk.img,if=none,id=d0,format=raw",
        "-device", "virtio-blk-device,drive=d0,serial=abc", "-netdev", "user,id=n0,hostfwd=tcp::2222-:22",
        "-device", "virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01",
        "-device", "vhost-vsock-pci,guest-cid=3", "-object", "rng-random,id=r0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=r0", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-nographic",
        "-serial", "stdio", "-qmp", "unix:/tmp/q.sock,server,wait=off", "-no-reboot", "-name", "guest=vm1",
        "-pidfile", "/tmp/p.pid",
    ]  # fmt: skip
    tap = [
        "-kernel", "k", "-netdev", "tap,id=t,ifname=tap0,script=no,downscript=no", "-device",
        "virtio-net-device,netdev=t", "-drive", "file=a,,b.img,if=virtio,readonly=on",
        "-serial", "file:/tmp/c", "-smp", "4,sockets=1,cores=4,threads=1,maxcpus=4", "-m", "size=1G",
        "-display", "none", "-monitor", "none",
        "-global", "virtio-mmio.force-legacy=false", "-machine", "q35,accel=kvm", "-accel", "kvm",
    ]  # fmt: skip
    return {
        "full": "\0".join(full).encode(),
        "tap-and-more": "\0".join(tap).encode(),
        "minimal": b"-kernel\0vmlinux",
        "unsupported": b"-kernel\0k\0-hda\0disk.img",
    }


SEEDS = {"api_http": api_http, "fc_config": fc_config, "snapshot": snapshot, "loader": loader, "qemu": qemu}


def main() -> None:
    for target, make in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
