"""``pyrovm qemu``: QEMU's command line.  The same test-guest command lines given to real QEMU (Debian's
qemu-system-x86, microvm) and to ``pyrovm qemu`` give the same console output and exit status; ``kvm=off``
hides the KVM signature in both; a minimal QMP; and bad command lines, one line each with status 2."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pyrovm.qemu.args import QemuArgError, parse_props, split_options
from pyrovm.qemu.translate import translate
from pyrovm.testguest import QEMU_ARGS

from conftest import cli_env, needs_kvm, pyrovm_argv

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86")


def _normalize(text: str) -> list[str]:
    """What must match: the blk line without the device's own offers and addresses, rng without its bytes,
    the vCPUs' lines in APIC-id order (they come up in any order)."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"( features 0x[0-9a-f]+) offered .*", r"\1", line)
        line = re.sub(r"^(rng ok \d+) [0-9a-f]+$", r"\1", line)
        line = re.sub(r"^cpu \d+ (apic-id \d+)$", r"\1", line)
        out.append(line)
    return sorted(out) if any(line.startswith("apic-id ") for line in out) else out


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    return p.returncode, _normalize(p.stdout)


CASES = {
    "hello": ([], "test=hello"),
    "exit-status": ([], "test=exit status=5"),
    "smp4": (["-smp", "4"], "test=cpus"),
    "kvm-on": ([], "test=hv"),
    "kvm-off": (["-cpu", "qemu64,-cx16,-xsave,kvm=off"], "test=hv"),
    "disk": (
        ["-drive", "file={img},if=none,id=d0,format=raw", "-device", "virtio-blk-device,drive=d0"],
        "test=blk",
    ),
    "rng": (
        ["-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r"],
        "test=rng",
    ),
}


@needs_kvm
@needs_qemu
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_output_and_status_as_qemu(guest: Path, tmp_path: Path, case: str) -> None:
    extra, cmdline = CASES[case]
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    extra = [a.format(img=img) for a in extra]
    base = list(QEMU_ARGS[1:])
    if "-cpu" in extra:  # the case's own -cpu replaces the default one
        i = base.index("-cpu")
        del base[i : i + 2]
    args = [*base, *extra, "-kernel", str(guest), "-append", cmdline]
    qemu = _run(["qemu-system-x86_64", *args])
    img.write_bytes(bytes(1 << 20))
    ours = _run(pyrovm_argv("qemu", *args), cli_env())
    assert ours == qemu
    assert qemu[0] == (11 if case == "exit-status" else 1)  # isa-debug-exit: (v << 1) | 1
    if case.startswith("kvm"):
        assert ("signature KVMKVMKVM" in qemu[1][0]) == (case == "kvm-on")


@needs_kvm
def test_qmp_status_stop_cont_quit(guest: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        pyrovm_argv(
            "qemu",
            "-enable-kvm",
            "-M",
            "microvm",
            "-m",
            "64",
            "-nographic",
            "-qmp",
            f"unix:{sock_path},server,wait=off",
            "-kernel",
            str(guest),
            "-append",
            "test=spin",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock_path))
            f = s.makefile("rwb")

            def cmd(name: str) -> dict[str, object]:
                f.write(json.dumps({"execute": name}).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "event" not in msg:
                        return msg  # type: ignore[no-any-return]

            assert "QMP" in json.loads(f.readline())
            assert cmd("query-status")["error"]["class"] == "CommandNotFound"  # type: ignore[index]
            assert cmd("qmp_capabilities") == {"return": {}}
            assert cmd("query-status")["return"]["status"] == "running"  # type: ignore[index]
            assert cmd("stop") == {"return": {}}
            assert cmd("query-status")["return"]["status"] == "paused"  # type: ignore[index]
            assert cmd("cont") == {"return": {}}
            assert cmd("no-such-command")["error"]["class"] == "CommandNotFound"  # type: ignore[index]
            assert cmd("quit") == {"return": {}}
        assert proc.wait(30) == 128 + 0 or proc.returncode == 0
        assert not sock_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


BAD = [
    (["-kernel", "k", "-hda", "x.img"], "-hda: not supported by pyrovm qemu (nearest: -drive file=IMG"),
    (["-kernel", "k", "-vga", "std"], "-vga: not supported"),
    (["-kernel", "k", "-bogus"], "-bogus: not supported by pyrovm qemu"),
    (["disk.img"], "not an option"),
    (["-kernel"], "-kernel: requires an argument"),
    (["-m", "128"], "-kernel is required"),
    (["-kernel", "k", "-accel", "tcg"], "pyrovm runs on KVM only"),
    (["-kernel", "k", "-M", "virt"], "-machine virt: not one of q35, pc, microvm"),
    (["-kernel", "k", "-M", "q35,accel=tcg"], "KVM only"),
    (["-kernel", "k", "-M", "q35,nvdimm=on"], "property nvdimm is not supported"),
    (["-kernel", "k", "-m", "lots"], "not a size"),
    (["-kernel", "k", "-m", "0"], "positive"),
    (["-kernel", "k", "-m", "1G,slots=2,maxmem=4G"], "no memory hotplug"),
    (["-kernel", "k", "-smp", "0"], "not a positive number"),
    (["-kernel", "k", "-smp", "4,maxcpus=8"], "maxcpus must equal cpus"),
    (["-kernel", "k", "-smp", "cpus=4,sockets=3"], "sockets * cores * threads = 3"),
    (
        ["-kernel", "k", "-cpu", "Skylake-Client"],
        "-cpu Skylake-Client: pyrovm gives the guest the host's CPU",
    ),
    (["-kernel", "k", "-cpu", "host,+nosuchfeat"], "unknown CPU feature nosuchfeat"),
    (["-kernel", "k", "-cpu", "host,pmu=off"], "pmu=off is not supported"),
    (["-kernel", "k", "-drive", "file=x.qcow2,format=qcow2"], "format=qcow2: pyrovm reads raw images only"),
    (["-kernel", "k", "-drive", "if=virtio"], "file= is required"),
    (["-kernel", "k", "-drive", "file=x,if=none"], "needs an id="),
    (["-kernel", "k", "-drive", "file=x,snapshot=on"], "snapshot is not supported"),
    (["-kernel", "k", "-device", "e1000,netdev=n"], "-device e1000: not a device pyrovm has"),
    (["-kernel", "k", "-device", "virtio-blk-pci,drive=d9"], "no -drive with if=none,id=d9"),
    (["-kernel", "k", "-device", "virtio-net-pci,netdev=n9"], "no -netdev with id=n9"),
    (["-kernel", "k", "-device", "isa-debug-exit,iobase=0x501"], "pyrovm's exit port is iobase=0xf4"),
    (["-kernel", "k", "-device", "vhost-vsock-pci"], "guest-cid=N is required"),
    (["-kernel", "k", "-netdev", "bridge,id=n"], "-netdev bridge: pyrovm has user (passt) and tap"),
    (["-kernel", "k", "-netdev", "tap,id=n,ifname=t0,script=/etc/qemu-ifup"], "pyrovm runs no scripts"),
    (["-kernel", "k", "-netdev", "user"], "id= is required"),
    (["-kernel", "k", "-serial", "tcp::4444,server"], "-serial tcp::4444,server: pyrovm takes stdio"),
    (["-kernel", "k", "-serial", "stdio", "-serial", "null"], "one serial port"),
    (["-kernel", "k", "-display", "gtk"], "pyrovm has no display"),
    (["-kernel", "k", "-monitor", "stdio"], "pyrovm has no human monitor"),
    (["-kernel", "k", "-qmp", "tcp:localhost:4444,server"], "Unix socket only"),
    (["-kernel", "k", "-qmp", "unix:/tmp/q.sock,server"], "wait=off"),
    (["-kernel", "k", "-object", "memory-backend-ram,id=m,size=1G"], "rng-random and rng-builtin"),
    (["-kernel", "k", "-object", "rng-random,id=r,filename=/dev/hwrng"], "getrandom"),
    (["-kernel", "k", "-global", "kvm-pit.lost_tick_policy=discard"], "-global kvm-pit"),
    (["-kernel", "k", "-M", "microvm,,acpi=off"], "property microvm,acpi is not supported"),  # ",,": ","
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_lines(argv: list[str], message: str) -> None:
    with pytest.raises(QemuArgError) as info:
        translate(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_command_lines_through_the_command_are_one_line_status_2() -> None:
    for argv, message in BAD[:6]:
        p = subprocess.run(
            pyrovm_argv("qemu", *argv), capture_output=True, text=True, env=cli_env(), timeout=60
        )
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, (argv, p.stderr)


def test_property_lists_and_the_seed_command_line(tmp_path: Path) -> None:
    assert parse_props("virtio-net-pci,netdev=n,,1,mac=52:54:00:12:34:56", "device", "driver") == {
        "driver": "virtio-net-pci",
        "netdev": "n,1",
        "mac": "52:54:00:12:34:56",
    }
    assert parse_props("unix:/q.sock,server,wait=off", "qmp", "addr")["server"] == "on"
    assert split_options(["--enable-kvm", "-m", "1G"]) == [("enable-kvm", None), ("m", "1G")]
    kernel, initrd, disk = (tmp_path / n for n in ("bzImage", "initrd.img", "disk.img"))
    seed = (
        "-enable-kvm -M q35 -m 8192 -cpu host,kvm=off -smp 4 -kernel {k} -initrd {i} -append "
        "console=ttyS0 root=/dev/vda -drive file={d},if=virtio,format=raw -nographic"
    )
    words = seed.format(k=kernel, i=initrd, d=disk).split()
    j = words.index("-append")
    words[j + 1 : j + 3] = [" ".join(words[j + 1 : j + 3])]
    setup = translate(words)
    c = setup.config
    assert (c.memory, c.cpus, c.hide_kvm, c.kernel, c.initrd) == (8192 << 20, 4, True, kernel, initrd)
    assert c.cmdline == "console=ttyS0 root=/dev/vda" and c.disks[0].path == disk and c.console == "stdio"
    assert any("no PCI bus" in n for n in setup.notices)
