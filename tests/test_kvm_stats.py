"""KVM's binary statistics (pyrovm.kvm.stats) and ``pyrovm stat``: the layouts against <linux/kvm.h>, the
parser on files made here (good, short, truncated, implausible), the real stats fds of a VM and a vCPU of
this host's KVM with counters moved by the test guest, and the command against a live VM in another
process (its table, rates and one-line errors)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyrovm.errors import HostError, PyrovmError
from pyrovm.kvm import KvmError
from pyrovm.kvm import stats as st

from conftest import cli_env, kvm_usable, needs_kvm

# --- the ABI ----------------------------------------------------------------------------------------------

CONSTANTS = [
    name
    for name in dir(st)
    if name.startswith(("KVM_STATS_TYPE_", "KVM_STATS_UNIT_", "KVM_STATS_BASE_"))
    or name == "KVM_GET_STATS_FD"
] + ["KVM_CAP_BINARY_STATS_FD"]


def test_ioctl_number() -> None:
    assert st.KVM_GET_STATS_FD == 0xAECE  # _IO(0xAE, 0xce): no direction, no size
    assert st.KVM_CAP_BINARY_STATS_FD == 203
    assert st.HEADER.size == 24 and st.DESC_HEAD.size == 16


def test_layouts_and_constants_match_kernel_headers(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or <linux/kvm.h> (Debian linux-libc-dev) not installed")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    lines.append('printf("header %zu\\n", sizeof(struct kvm_stats_header));')
    lines.append('printf("desc %zu\\n", sizeof(struct kvm_stats_desc));')
    for f in ("flags", "name_size", "num_desc", "id_offset", "desc_offset", "data_offset"):
        lines.append(f'printf("header.{f} %zu\\n", offsetof(struct kvm_stats_header, {f}));')
    for f in ("flags", "exponent", "size", "offset", "bucket_size", "name"):
        lines.append(f'printf("desc.{f} %zu\\n", offsetof(struct kvm_stats_desc, {f}));')
    for name in CONSTANTS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0;}")
    (tmp_path / "abi.c").write_text("\n".join(lines))
    subprocess.run(
        ["gcc", "-o", str(tmp_path / "abi"), str(tmp_path / "abi.c")], check=True, capture_output=True
    )
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True).stdout
    c = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert c["header"] == st.HEADER.size
    assert c["desc"] == st.DESC_HEAD.size == c["desc.name"]
    assert [c[f"header.{f}"] for f in ("flags", "name_size", "num_desc", "id_offset", "desc_offset")] == [
        0,
        4,
        8,
        12,
        16,
    ]
    assert [c[f"desc.{f}"] for f in ("flags", "exponent", "size", "offset", "bucket_size")] == [
        0,
        4,
        6,
        8,
        12,
    ]
    for name in CONSTANTS:
        assert getattr(st, name) == c[name], name


# --- the parser, on files made here -----------------------------------------------------------------------

NAME_SIZE = 48


def stats_file(
    descs: list[tuple[str, int, int, int]],
    data: list[int],
    ident: str = "kvm-1/vcpu-0",
    name_size: int = NAME_SIZE,
) -> bytes:
    """A stats file as the kernel lays it out: header, id, descriptors (name, flags, size, offset), data."""
    id_offset = st.HEADER.size
    desc_offset = id_offset + name_size
    data_offset = desc_offset + len(descs) * (st.DESC_HEAD.size + name_size)
    out = st.HEADER.pack(0, name_size, len(descs), id_offset, desc_offset, data_offset)
    out += ident.encode().ljust(name_size, b"\0")
    for name, flags, size, offset in descs:
        out += st.DESC_HEAD.pack(flags, -9 if flags & st.KVM_STATS_UNIT_MASK else 0, size, offset, 0)
        out += name.encode().ljust(name_size, b"\0")
    return out + struct.pack(f"<{len(data)}Q", *data)


HIST = st.KVM_STATS_TYPE_LOG_HIST | st.KVM_STATS_UNIT_SECONDS
GOOD = [
    ("exits", st.KVM_STATS_TYPE_CUMULATIVE, 1, 0),
    ("blocking", st.KVM_STATS_TYPE_INSTANT | st.KVM_STATS_UNIT_BOOLEAN, 1, 8),
    ("wait_hist", HIST, 3, 16),
    ("max_rmap", st.KVM_STATS_TYPE_PEAK | st.KVM_STATS_BASE_POW2, 1, 40),
]


def open_bytes(tmp_path: Path, data: bytes, name: str = "stats") -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_reader_parses_a_well_formed_file(tmp_path: Path) -> None:
    with st.StatsReader(open_bytes(tmp_path, stats_file(GOOD, [7, 1, 1, 2, 3, 9]))) as r:
        assert r.id == "kvm-1/vcpu-0" and r.vcpu_index == 0
        assert [d.name for d in r.descriptors] == ["exits", "blocking", "wait_hist", "max_rmap"]
        hist = r.descriptors[2]
        assert hist.is_histogram and not hist.is_scalar and hist.size == 3 and hist.exponent == -9
        assert hist.type == st.KVM_STATS_TYPE_LOG_HIST and hist.unit == st.KVM_STATS_UNIT_SECONDS
        assert r.descriptors[1].unit == st.KVM_STATS_UNIT_BOOLEAN
        assert (
            r.descriptors[3].base == st.KVM_STATS_BASE_POW2
            and r.descriptors[3].type == st.KVM_STATS_TYPE_PEAK
        )
        assert r.read() == {"exits": 7, "blocking": 1, "wait_hist": [1, 2, 3], "max_rmap": 9}
        assert r.data_size == 48
    assert r.fd == -1
    with pytest.raises(st.StatsError, match="after close"):
        r.read()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0" * 10, "short header"),
        (st.HEADER.pack(0, 0, 1, 24, 24, 24), "implausible header"),
        (st.HEADER.pack(0, 1 << 20, 1, 24, 24, 24), "implausible header"),
        (stats_file(GOOD, [0] * 6)[:200], "short descriptors"),
        (stats_file(GOOD, [0] * 6)[:30], "short id string"),
        (stats_file([("", 0, 1, 0)], [0]), "descriptor 0 is invalid"),
        (stats_file([("x", 0, 0, 0)], [0]), "descriptor 0 is invalid"),
        (stats_file([("x", 0, 1, 4)], [0]), "descriptor 0 is invalid"),
        (stats_file([("x", 0, 100, 1 << 31)], [0]), "implausible data block"),
    ],
    ids=[
        "short-header",
        "name-size-0",
        "name-size-huge",
        "short-descriptors",
        "short-id",
        "empty-name",
        "size-0",
        "unaligned-offset",
        "huge-data",
    ],
)
def test_reader_rejects_a_bad_file_with_one_error_and_closes_it(
    tmp_path: Path, data: bytes, message: str
) -> None:
    fd = open_bytes(tmp_path, data)
    with pytest.raises(st.StatsError, match=message) as info:
        st.StatsReader(fd)
    assert not is_open(fd)
    assert isinstance(info.value, HostError) and isinstance(info.value, PyrovmError)


def test_truncated_data_block_is_a_stats_error_on_read(tmp_path: Path) -> None:
    with st.StatsReader(open_bytes(tmp_path, stats_file(GOOD, [0] * 6)[:-8])) as r:
        with pytest.raises(st.StatsError, match="short data block"):
            r.read()


def test_open_stats_fd_on_a_non_kvm_fd_is_a_kvm_error() -> None:
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(KvmError) as info:
            st.open_stats_fd(rfd)
        assert info.value.errno is not None and "KVM_GET_STATS_FD" in str(info.value)
    finally:
        os.close(rfd)
        os.close(wfd)


def fake_group(tmp_path: Path, vcpu_data: list[list[int]], vm_data: list[int]) -> st.StatsGroup:
    vm_descs = [("flushes", 0, 1, 0), ("pages", st.KVM_STATS_TYPE_INSTANT, 1, 8)]
    readers = [st.StatsReader(open_bytes(tmp_path, stats_file(vm_descs, vm_data, ident="kvm-1"), "vm"))]
    for i, data in enumerate(vcpu_data):
        file = stats_file(GOOD, data, ident=f"kvm-1/vcpu-{i}")
        readers.append(st.StatsReader(open_bytes(tmp_path, file, f"vcpu{i}")))
    return st.StatsGroup.of(reversed(readers))


def test_rows_rates_sorting_and_table(tmp_path: Path) -> None:
    group = fake_group(tmp_path, [[10, 1, 0, 0, 0, 5], [30, 0, 0, 0, 0, 8]], [0, 12])
    try:
        assert [r.id for r in group.vm] == ["kvm-1"] and group.vcpu_labels() == ["vcpu0", "vcpu1"]
        now = group.sample()
        before = st.Sample(now.time - 2.0, ({"flushes": 0, "pages": 3},), ({"exits": 4}, {"exits": 10}))
        rows = st.stat_rows(group, now, before)
        by_name = {r.name: r for r in rows}
        assert [r.name for r in rows] == ["exits", "pages", "max_rmap", "blocking"]  # rate, then total
        assert by_name["exits"].total == 40 and by_name["exits"].rate == pytest.approx(13.0)
        assert by_name["exits"].per_vcpu == (pytest.approx(3.0), pytest.approx(10.0))
        assert by_name["max_rmap"].total == 8 and by_name["max_rmap"].rate is None  # peak: the maximum
        assert by_name["blocking"].per_vcpu == (1, 0) and by_name["pages"].per_vcpu == ()
        everything = st.stat_rows(group, now, before, show_all=True)
        assert {r.name for r in everything} == {"exits", "pages", "max_rmap", "blocking", "flushes"}
        table = st.format_table(rows, group.vcpu_labels())
        assert table[0].split() == ["Event", "Total", "/s", "vcpu0/s", "vcpu1/s"]
        assert table[1].split() == ["exits", "40", "13.0", "3.0", "10.0"]
        assert table[2].split() == ["pages", "12"]
        assert st.format_table(st.stat_rows(group, now))[1].split() == ["exits", "40"]  # no rate yet
        snap = st.stats_snapshot([*group.vm, *group.vcpus])
        assert snap["id"] == "kvm-1" and snap["vm"] == {"flushes": 0, "pages": 12}
        assert snap["vcpu_total"] == {"exits": 40, "blocking": 1, "wait_hist": [0, 0, 0], "max_rmap": 8}
        assert isinstance(snap["vcpus"], list) and snap["vcpus"][1]["exits"] == 30
    finally:
        group.close()


# --- this host's KVM ---------------------------------------------------------------------------------------


def binary_stats_or_skip() -> None:
    if kvm_usable() is not None:
        pytest.skip(kvm_usable() or "")
    from pyrovm.kvm import Kvm

    with Kvm() as kvm:
        if kvm.check_extension(st.KVM_CAP_BINARY_STATS_FD) <= 0:
            pytest.skip("this kernel's KVM has no binary statistics (KVM_CAP_BINARY_STATS_FD)")


@needs_kvm
def test_vm_and_vcpu_stats_fds_of_this_host() -> None:
    binary_stats_or_skip()
    from pyrovm.kvm import Kvm

    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            vm_fd, vcpu_fd = st.open_stats_fd(vm.fd), st.open_stats_fd(vcpu.fd)
            assert os.readlink(f"/proc/self/fd/{vm_fd}") == "anon_inode:kvm-vm-stats"
            assert os.readlink(f"/proc/self/fd/{vcpu_fd}").startswith("anon_inode:kvm-vcpu-stats")
            with st.StatsReader(vm_fd) as vm_stats, st.StatsReader(vcpu_fd) as vcpu_stats:
                assert vm_stats.id == f"kvm-{os.getpid()}" and vm_stats.vcpu_index is None
                assert vcpu_stats.id == f"kvm-{os.getpid()}/vcpu-0" and vcpu_stats.vcpu_index == 0
                for reader in (vm_stats, vcpu_stats):
                    names = [d.name for d in reader.descriptors]
                    assert names and all(names) and len(set(names)) == len(names)
                    assert all(d.size >= 1 and d.type in st.TYPE_NAMES for d in reader.descriptors)
                    first, second = reader.read(), reader.read()
                    assert list(first) == list(second) == names
                    for d in reader.descriptors:
                        value = second[d.name]
                        assert isinstance(value, list) == (not d.is_scalar)
                        assert len(value) == d.size if isinstance(value, list) else value >= 0
                assert "exits" in {d.name for d in vcpu_stats.descriptors}
        finally:
            vm.close()


@needs_kvm
def test_counters_move_when_a_guest_runs(guest: Path) -> None:
    binary_stats_or_skip()
    from pyrovm import VM

    vm = VM(guest, memory="32M", cmdline="test=pio count=5000")
    readers: list[st.StatsReader] = []
    try:
        readers.append(st.open_stats(vm.machine.kvm_vm.fd))
        readers += [st.open_stats(v.fd) for v in vm.machine.kvm_vm.vcpus]
        group = st.StatsGroup.of(readers)
        before = group.sample()
        result = vm.run(timeout=30)
        assert result.guest_status == 0, result
        vm.close()
        after = group.sample()  # still readable after the VM is closed: the stats fds hold it
        vcpu = {name: value for name, value in after.vcpus[0].items() if isinstance(value, int)}
        assert vcpu["exits"] >= 5000
        # each `out` is an I/O exit on VT-x/AMD-V; PVM emulates it instead (io_exits stays 0 there)
        assert max(vcpu.get("io_exits", 0), vcpu.get("insn_emulation", 0)) >= 5000
        rows = {r.name: r for r in st.stat_rows(group, after, before)}
        assert rows["exits"].rate is not None and rows["exits"].rate > 0
        total = st.stats_snapshot(readers)["vcpu_total"]
        assert isinstance(total, dict) and total["exits"] >= 5000
    finally:
        vm.close()
        for reader in readers:
            reader.close()


# --- pyrovm stat --------------------------------------------------------------------------------------------

HOLDER = """\
import sys, time
from pyrovm import VM

vm = VM(sys.argv[1], memory="32M", cpus=2, cmdline="test=pio count=100000000")  # (it keeps its stats fds)
vm.start()
print("ready", flush=True)
vm.wait(timeout=float(sys.argv[2]))
"""


def pyrovm_stat(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrovm.stat_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def live_vm(guest: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The pid of a process running the test guest (2 vCPUs, vCPU 0 in a port-I/O loop): pyrovm keeps the
    VM's and the vCPUs' stats fds open."""
    binary_stats_or_skip()
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(guest), "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read() if proc.stderr else ""
        yield proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def parse_table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Event"))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 :] if line.strip()}


@needs_kvm
def test_stat_once_shows_counters_with_rates(live_vm: int) -> None:
    p = pyrovm_stat(str(live_vm), "--once", "--interval", "0.5")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and p.stderr == ""
    assert f"process {live_vm} (kvm-{live_vm}), 1 VM, 2 vCPUs" in p.stdout.splitlines()[0]
    table = parse_table(p.stdout)
    total, rate = int(table["exits"][0]), float(table["exits"][1])
    assert total > 0 and rate > 100, p.stdout
    assert all(int(cols[0]) != 0 or float(cols[1]) != 0 for cols in table.values() if len(cols) > 1)
    rates = [float(cols[1]) for cols in table.values() if len(cols) > 1]
    assert rates == sorted(rates, reverse=True)  # by rate first

    p = pyrovm_stat(str(live_vm), "--once", "--interval", "0.3", "--vcpus", "--all")
    assert p.returncode == 0, p.stderr
    header = next(line for line in p.stdout.splitlines() if line.startswith("Event"))
    assert header.split() == ["Event", "Total", "/s", "vcpu0/s", "vcpu1/s"]
    table = parse_table(p.stdout)
    assert "halt_exits" in table or "io_exits" in table  # zeros shown with --all
    exits = table["exits"]
    assert float(exits[2]) > 100  # vCPU 0 runs the loop


@needs_kvm
def test_stat_refreshes_until_the_process_ends(live_vm: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrovm.stat_cli", str(live_vm), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    time.sleep(1.5)
    os.kill(live_vm, 9)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("Event") >= 3  # not a terminal: one plain block per refresh
    assert err == f"pyrovm stat: process {live_vm} ended\n"


@needs_kvm
def test_stat_on_a_terminal_refreshes_in_place_until_ctrl_c(live_vm: int) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyrovm.stat_cli", str(live_vm), "--interval", "0.2"],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + 20
        while out.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                out += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert out.count(b"\x1b[H\x1b[2J") >= 3  # cleared and redrawn in place
    assert out.startswith(b"\x1b[?25l") and out.endswith(b"\x1b[?25h")  # the cursor is back at the end
    assert b"exits" in out


def test_stat_errors_are_one_line_with_status_2() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    p = pyrovm_stat(str(child.pid), "--once")  # reaped: no such process (unless the pid was reused at once)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"pyrovm stat: no process {child.pid}\n"

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        p = pyrovm_stat(str(sleeper.pid), "--once", "--interval", "0.1")
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and "has no KVM stats file descriptors" in p.stderr
    finally:
        sleeper.kill()
        sleeper.wait()

    p = pyrovm_stat(str(os.getpid()), "--interval", "0")
    assert p.returncode == 2 and p.stderr == "pyrovm stat: --interval must be a positive number of seconds\n"
    p = pyrovm_stat("notapid")
    assert p.returncode == 2 and "invalid int value" in p.stderr


def test_stat_help_explains() -> None:
    p = pyrovm_stat("--help")
    assert p.returncode == 0
    for word in ("PID", "--interval", "--once", "--vcpus", "--all", "rate per second", "ptrace"):
        assert word in p.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_stat_without_permission_is_one_line() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        p = subprocess.run(
            [*argv, sys.executable, "-m", "pyrovm.stat_cli", str(sleeper.pid), "--once"],
            capture_output=True,
            text=True,
            timeout=30,
            env=cli_env(),
        )
        if "pyrovm stat:" not in p.stderr:
            pytest.skip(f"cannot run this checkout as nobody: {p.stderr.strip()[-200:]}")
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and "permission" in p.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
