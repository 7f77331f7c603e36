"""The VM config: :mod:`pyrovm.config` (validation without /dev/kvm, JSON, sizes, disk specs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyrovm import config as config_mod
from pyrovm.config import (
    CMDLINE_LIMIT,
    DEFAULT_CMDLINE,
    DEFAULT_MEMORY,
    MAX_CPUS,
    MIN_MEMORY,
    DiskSpec,
    NetSpec,
    VmConfig,
    VsockSpec,
    host_memory,
    parse_size,
)
from pyrovm.devices.ratelimit import BucketSpec, RateLimitSpec
from pyrovm.errors import ConfigError, PyrovmError


# -- helpers --------------------------------------------------------------------------------------------
def _file(path: Path, data: bytes = b"\x7fELF" + bytes(60)) -> Path:
    path.write_bytes(data)
    return path


def _sparse(path: Path, size: int) -> Path:
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    assert path.stat().st_size == size
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    return _file(tmp_path / "vmlinux")


@pytest.fixture
def disk_a(tmp_path: Path) -> Path:
    return _file(tmp_path / "a.img", b"A" * 4096)


@pytest.fixture
def disk_b(tmp_path: Path) -> Path:
    return _file(tmp_path / "b.img", b"B" * 4096)


@pytest.fixture
def base(kernel: Path) -> VmConfig:
    cfg = VmConfig(kernel=kernel)
    cfg.validate()  # every failing case below differs from a valid config in one field
    return cfg


def _fails(cfg: VmConfig, *patterns: str) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    msg = str(info.value)
    assert "\n" not in msg
    for pattern in patterns:
        assert pattern in msg, f"{pattern!r} not in {msg!r}"
    return msg


def _full(tmp_path: Path) -> VmConfig:
    """A config with every field set away from its default."""
    _file(tmp_path / "bzImage")
    _file(tmp_path / "initrd.cpio", b"070701" + bytes(100))
    _file(tmp_path / "root.img", bytes(4096))
    _file(tmp_path / "d1.img", bytes(4096))
    _file(tmp_path / "d2.img", bytes(4096))
    return VmConfig(
        kernel=tmp_path / "bzImage",
        memory=256 << 20,
        cpus=4,
        cmdline='console=ttyS0 foo="a b" quiet',
        initrd=tmp_path / "initrd.cpio",
        boot="linux64",
        cpu_vendor="GenuineIntel",
        disks=(
            DiskSpec(
                tmp_path / "d1.img",
                read_only=True,
                serial="data-1",
                rate_limiter=RateLimitSpec(BucketSpec(4096, 100)),
            ),
            DiskSpec(tmp_path / "d2.img", read_only=False, serial=None),
        ),
        rootfs=DiskSpec(tmp_path / "root.img", read_only=True, serial="root"),
        rng=True,
        rng_rate=4096,
        host_workarounds=False,
        boot_marker=r"login: \w+",
        console=f"file:{tmp_path / 'console.log'}",
        metrics_path=tmp_path / "metrics.json",
        timeout=12.5,
        kvm_device="/dev/kvm-other",
        net=(
            NetSpec.parse("tap=tap7,mac=02:00:00:00:00:07,mtu=9000"),
            NetSpec.parse("user,hostfwd=udp::5555-:7"),
        ),
        name="vm-7",
        vsock=VsockSpec(9, tmp_path / "v.sock"),
        track_dirty_pages=True,
        hide_kvm=True,
        coalesced_io=False,
        cpu_features=("-avx", "+sse2"),
    )


# -- parse_size -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("128M", 128 << 20),
        ("128m", 128 << 20),
        ("1G", 1 << 30),
        ("2g", 2 << 30),
        ("512K", 512 << 10),
        ("1T", 1 << 40),
        ("4096B", 4096),
        ("4096b", 4096),
        ("128", 128 << 20),  # a bare number is MiB
        (" 64M ", 64 << 20),
        ("1GiB", 1 << 30),
        ("1GB", 1 << 30),
        ("2kib", 2 << 10),
        ("128 M", 128 << 20),
        ("0", 0),
        (128, 128 << 20),  # an int is MiB
        (0, 0),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["", "abc", "12X", "1.5G", "-1", "-128M", "M", "1 2M", "0x10M", "128MM", "4096iB", "1 iB", "B"]
)
def test_parse_size_garbage(value: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(value)


def test_parse_size_bad_types_and_negative() -> None:
    with pytest.raises(ConfigError, match="negative"):
        parse_size(-1)
    for bad in (True, 1.5, None, b"128M"):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^initrd size"):
        parse_size("x", "initrd")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_size("x")
    assert issubclass(ConfigError, PyrovmError)


# -- DiskSpec ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("disk.img", DiskSpec(Path("disk.img"))),
        ("/a/b.img,ro", DiskSpec(Path("/a/b.img"), read_only=True)),
        ("/a/b.img,readonly", DiskSpec(Path("/a/b.img"), read_only=True)),
        ("b.img,ro,rw", DiskSpec(Path("b.img"), read_only=False)),
        ("b.img,serial=vol1", DiskSpec(Path("b.img"), serial="vol1")),
        ("b.img,serial=", DiskSpec(Path("b.img"), serial="")),
        ("b.img,serial=x,ro", DiskSpec(Path("b.img"), read_only=True, serial="x")),
        ("b.img,ro,serial=x=y", DiskSpec(Path("b.img"), read_only=True, serial="x=y")),
    ],
)
def test_diskspec_parse(spec: str, expected: DiskSpec) -> None:
    assert DiskSpec.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no path"),
        (",ro", "no path"),
        ("a.img,rx", "unknown option 'rx'"),
        ("a.img,", "unknown option ''"),
        ("a.img,ro,Serial=x", "unknown option 'Serial=x'"),
    ],
)
def test_diskspec_parse_bad(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="disk") as info:
        DiskSpec.parse(spec)
    assert message in str(info.value)


def test_diskspec_of(tmp_path: Path) -> None:
    d = DiskSpec(tmp_path / "x", True, "s")
    assert DiskSpec.of(d) is d
    assert DiskSpec.of("x.img,ro") == DiskSpec(Path("x.img"), read_only=True)
    # a path is a path, not a spec: a comma in it stays in the name
    assert DiskSpec.of(Path("dir,ro/x.img")) == DiskSpec(Path("dir,ro/x.img"))
    assert DiskSpec.of(tmp_path / "y.img").path == tmp_path / "y.img"


def test_diskspec_validate(tmp_path: Path, disk_a: Path) -> None:
    DiskSpec(disk_a).validate()
    DiskSpec(disk_a, serial="x" * 20).validate()
    with pytest.raises(ConfigError, match="no such file"):
        DiskSpec(tmp_path / "missing.img").validate()
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        DiskSpec(tmp_path).validate()
    with pytest.raises(ConfigError, match="serial"):
        DiskSpec(disk_a, serial="x" * 21).validate()
    with pytest.raises(ConfigError, match="serial"):
        DiskSpec(disk_a, serial="s\u00e9rie").validate()


def test_diskspec_validate_access(disk_a: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    # tests run as root, for whom os.access passes: fake a file that is readable but not writable
    monkeypatch.setattr(config_mod.os, "access", lambda p, mode: real(p, mode) and not mode & os.W_OK)
    DiskSpec(disk_a, read_only=True).validate()
    with pytest.raises(ConfigError, match="not writable"):
        DiskSpec(disk_a).validate()
    monkeypatch.setattr(config_mod.os, "access", lambda p, mode: False)
    with pytest.raises(ConfigError, match="not readable"):
        DiskSpec(disk_a, read_only=True).validate()


# -- construction, replace -------------------------------------------------------------------------------
def test_defaults(kernel: Path) -> None:
    cfg = VmConfig(kernel)
    assert cfg.memory == DEFAULT_MEMORY
    assert cfg.cpus == 1
    assert cfg.cmdline == DEFAULT_CMDLINE
    assert cfg.boot == "auto"
    assert cfg.disks == () and cfg.rootfs is None and cfg.all_disks == ()
    assert cfg.console == "none" and cfg.console_path is None
    assert cfg.rng is False and cfg.rng_rate is None
    assert cfg.timeout is None
    assert cfg.host_workarounds is True


def test_post_init_converts(tmp_path: Path) -> None:
    cfg = VmConfig(
        kernel=str(tmp_path / "k"),  # type: ignore[arg-type]
        initrd=str(tmp_path / "i"),  # type: ignore[arg-type]
        disks=["a.img,ro", tmp_path / "b.img", DiskSpec(Path("c.img"), serial="c")],  # type: ignore[arg-type]
        rootfs="root.img,serial=r",  # type: ignore[arg-type]
        metrics_path=str(tmp_path / "m.json"),  # type: ignore[arg-type]
    )
    assert cfg.kernel == tmp_path / "k" and isinstance(cfg.kernel, Path)
    assert cfg.initrd == tmp_path / "i" and isinstance(cfg.initrd, Path)
    assert cfg.metrics_path == tmp_path / "m.json" and isinstance(cfg.metrics_path, Path)
    assert isinstance(cfg.disks, tuple)
    assert cfg.disks == (
        DiskSpec(Path("a.img"), read_only=True),
        DiskSpec(tmp_path / "b.img"),
        DiskSpec(Path("c.img"), serial="c"),
    )
    assert cfg.rootfs == DiskSpec(Path("root.img"), serial="r")
    assert cfg.all_disks == (cfg.rootfs, *cfg.disks)
    assert VmConfig("k") == VmConfig(Path("k"))  # type: ignore[arg-type]
    assert hash(VmConfig("k")) == hash(VmConfig(Path("k")))  # type: ignore[arg-type]


def test_post_init_bad_disk_spec() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        VmConfig(Path("k"), disks=["a.img,bogus"])  # type: ignore[list-item]


def test_rng_rate_implies_rng(kernel: Path) -> None:
    assert VmConfig(kernel, rng_rate=1000).rng is True
    assert VmConfig(kernel, rng=False, rng_rate=1000).rng is True
    assert VmConfig(kernel).rng is False
    assert VmConfig(kernel, rng=True).rng is True
    assert VmConfig(kernel).replace(rng_rate=10).rng is True


def test_frozen(base: VmConfig) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.cpus = 2  # type: ignore[misc]


def test_replace(base: VmConfig, tmp_path: Path) -> None:
    new = base.replace(cpus=2, disks=["x.img,ro"], initrd=str(tmp_path / "i"))
    assert new is not base
    assert base.cpus == 1 and base.disks == () and base.initrd is None
    assert new.cpus == 2
    assert new.disks == (DiskSpec(Path("x.img"), read_only=True),)
    assert new.initrd == tmp_path / "i"  # __post_init__ runs on the copy too
    assert new.kernel == base.kernel
    assert base.replace() == base
    with pytest.raises(TypeError):
        base.replace(no_such_field=1)


def test_console_path() -> None:
    assert VmConfig(Path("k"), console="file:/tmp/x.log").console_path == Path("/tmp/x.log")
    assert VmConfig(Path("k"), console="stdio").console_path is None
    assert VmConfig(Path("k"), console="none").console_path is None


# -- JSON ----------------------------------------------------------------------------------------------
def _round_trip(cfg: VmConfig) -> VmConfig:
    return VmConfig.from_json(json.loads(json.dumps(cfg.to_json())))


def test_json_round_trip_default(base: VmConfig) -> None:
    assert _round_trip(base) == base


def test_json_round_trip_every_field(tmp_path: Path) -> None:
    cfg = _full(tmp_path)
    cfg.validate()
    data = cfg.to_json()
    # every field is written, as plain JSON data
    assert set(data) == {f.name for f in dataclasses.fields(VmConfig)}
    for name, default in (
        (f.name, f.default) for f in dataclasses.fields(VmConfig) if f.default is not dataclasses.MISSING
    ):
        assert getattr(cfg, name) != default, f"{name} is still at its default"
    assert json.loads(json.dumps(data)) == data
    assert data["disks"][0] == {
        "path": str(tmp_path / "d1.img"),
        "read_only": True,
        "serial": "data-1",
        "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100, "one_time_burst": 0}, "ops": None},
    }
    assert data["rootfs"] == {
        "path": str(tmp_path / "root.img"),
        "read_only": True,
        "serial": "root",
        "rate_limiter": None,
    }
    assert data["net"][1] == {
        "backend": "user",
        "tap": None,
        "mac": None,
        "mtu": 1500,
        "hostfwd": ["udp:127.0.0.1:5555-:7"],
        "rx_rate_limiter": None,
        "tx_rate_limiter": None,
    }
    back = _round_trip(cfg)
    assert back == cfg
    assert isinstance(back.kernel, Path) and isinstance(back.initrd, Path)
    assert isinstance(back.metrics_path, Path) and isinstance(back.disks, tuple)
    assert back.console_path == tmp_path / "console.log"
    assert back.to_json() == data


@pytest.mark.parametrize("timeout", [0, 7, 0.25, math.inf, 1e300])
def test_json_round_trip_timeout(base: VmConfig, timeout: float) -> None:
    back = _round_trip(base.replace(timeout=timeout))
    assert back.timeout == timeout
    assert isinstance(back.timeout, float)


def test_from_json_minimal(kernel: Path) -> None:
    cfg = VmConfig.from_json({"kernel": str(kernel)})
    assert cfg == VmConfig(kernel)
    cfg = VmConfig.from_json(
        {"kernel": "k", "disks": [{"path": "a.img"}], "rootfs": {"path": "r", "read_only": True}}
    )
    assert cfg.disks == (DiskSpec(Path("a.img")),)
    assert cfg.rootfs == DiskSpec(Path("r"), read_only=True)


def test_from_json_nulls_for_optional_fields() -> None:
    cfg = VmConfig.from_json(
        {"kernel": "k", "initrd": None, "rootfs": None, "rng_rate": None, "timeout": None, "cpu_vendor": None}
    )
    assert cfg == VmConfig(Path("k"))


@pytest.mark.parametrize("data", [None, [], "kernel", 5, [{"kernel": "k"}]])
def test_from_json_not_an_object(data: Any) -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        VmConfig.from_json(data)


def test_from_json_missing_kernel() -> None:
    with pytest.raises(ConfigError, match="'kernel' is required"):
        VmConfig.from_json({})
    with pytest.raises(ConfigError, match="'kernel' is required"):
        VmConfig.from_json({"memory": 1 << 30})


def test_from_json_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown field.*'memroy'"):
        VmConfig.from_json({"kernel": "k", "memroy": 1 << 30})
    with pytest.raises(ConfigError) as info:
        VmConfig.from_json({"kernel": "k", "zeta": 1, "alpha": 2})
    assert "'alpha'" in str(info.value) and "'zeta'" in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown field.*'size'"):
        VmConfig.from_json({"kernel": "k", "disks": [{"path": "a", "size": 1}]})
    with pytest.raises(ConfigError, match=r"unknown field.*'ro'"):
        VmConfig.from_json({"kernel": "k", "rootfs": {"path": "a", "ro": True}})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", True),  # a bool where an int belongs
        ("memory", False),
        ("cpus", True),
        ("rng_rate", True),
        ("timeout", True),
        ("memory", 1.5),
        ("memory", "128M"),
        ("cpus", "2"),
        ("cpus", None),
        ("kernel", 5),
        ("kernel", None),
        ("kernel", ["k"]),
        ("cmdline", ["console=ttyS0"]),  # a list where a str belongs
        ("disks", "a.img"),  # a str where a list belongs
        ("disks", {"path": "a.img"}),
        ("disks", None),
        ("rng", 1),  # an int where a bool belongs
        ("rng", "true"),
        ("host_workarounds", 0),
        ("initrd", 3),
        ("boot", None),
        ("cpu_vendor", 12),
        ("boot_marker", ["x"]),
        ("console", None),
        ("metrics_path", True),
        ("timeout", "10"),
        ("kvm_device", None),
    ],
)
def test_from_json_wrong_type(field: str, value: Any) -> None:
    data: dict[str, Any] = {"kernel": "k", field: value}
    with pytest.raises(ConfigError) as info:
        VmConfig.from_json(data)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("disk", "field"),
    [
        ({"path": 5}, "path"),
        ({"path": "a", "read_only": 1}, "read_only"),
        ({"path": "a", "read_only": "yes"}, "read_only"),
        ({"path": "a", "serial": 5}, "serial"),
        ({"read_only": True}, "path"),
    ],
)
def test_from_json_bad_disk(disk: dict[str, Any], field: str) -> None:
    for data in ({"kernel": "k", "disks": [disk]}, {"kernel": "k", "rootfs": disk}):
        with pytest.raises(ConfigError, match="disk") as info:
            VmConfig.from_json(data)
        assert field in str(info.value)


def test_from_json_disk_not_an_object() -> None:
    with pytest.raises(ConfigError, match="disk: expected a JSON object"):
        VmConfig.from_json({"kernel": "k", "disks": ["a.img"]})
    with pytest.raises(ConfigError, match="disk: expected a JSON object"):
        VmConfig.from_json({"kernel": "k", "rootfs": "a.img"})


def test_from_json_does_not_validate_but_validate_catches(kernel: Path) -> None:
    cfg = VmConfig.from_json({"kernel": str(kernel), "cpus": 0, "timeout": float("nan")})
    assert cfg.cpus == 0
    _fails(cfg, "cpus")


# -- validate: kernel and initrd -----------------------------------------------------------------------
def test_validate_full_config(tmp_path: Path) -> None:
    _full(tmp_path).validate()


def test_kernel_missing(base: VmConfig, tmp_path: Path) -> None:
    _fails(base.replace(kernel=tmp_path / "nope"), "kernel", "nope", "no such file")


def test_kernel_is_directory(base: VmConfig, tmp_path: Path) -> None:
    _fails(base.replace(kernel=tmp_path), "kernel", "not a regular file")


def test_kernel_unreadable(base: VmConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = base.kernel
    real = os.access
    monkeypatch.setattr(
        config_mod.os, "access", lambda p, mode: False if Path(p) == kernel else real(p, mode)
    )
    _fails(base, "kernel", "not readable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_kernel_unreadable_for_real(base: VmConfig) -> None:
    base.kernel.chmod(0)
    _fails(base, "kernel", "not readable")


def test_kernel_larger_than_memory(base: VmConfig, tmp_path: Path) -> None:
    mem = 16 << 20
    _sparse(tmp_path / "big", mem)
    base.replace(kernel=tmp_path / "big", memory=mem).validate()  # exactly the memory size is accepted
    _sparse(tmp_path / "big", mem + 1)
    _fails(base.replace(kernel=tmp_path / "big", memory=mem), "kernel", "more than the guest's memory")


def test_initrd_checks(base: VmConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    initrd = _file(tmp_path / "initrd", b"x" * 100)
    base.replace(initrd=initrd).validate()
    _fails(base.replace(initrd=tmp_path / "no-initrd"), "initrd", "no such file")
    _fails(base.replace(initrd=tmp_path), "initrd", "not a regular file")
    _sparse(tmp_path / "big-initrd", MIN_MEMORY + 4096)
    _fails(base.replace(initrd=tmp_path / "big-initrd", memory=MIN_MEMORY), "initrd", "more than the guest")
    real = os.access
    monkeypatch.setattr(
        config_mod.os, "access", lambda p, mode: False if Path(p) == initrd else real(p, mode)
    )
    _fails(base.replace(initrd=initrd), "initrd", "not readable")


# -- validate: memory and cpus ----------------------------------------------------------------------------
def test_memory_too_small(base: VmConfig) -> None:
    base.replace(memory=MIN_MEMORY).validate()
    _fails(base.replace(memory=MIN_MEMORY - 4096), "too small")
    _fails(base.replace(memory=0), "too small")
    _fails(base.replace(memory=-(1 << 30)), "too small")


def test_memory_not_page_multiple(base: VmConfig) -> None:
    _fails(base.replace(memory=(64 << 20) + 1), "multiple of 4 KiB")
    _fails(base.replace(memory=(64 << 20) + 2048), "multiple of 4 KiB")
    base.replace(memory=(64 << 20) + 4096).validate()


def test_memory_not_int(base: VmConfig) -> None:
    _fails(base.replace(memory=True), "memory", "not a number")
    _fails(base.replace(memory=float(64 << 20)), "memory", "not a number")
    _fails(base.replace(memory="128M"), "memory", "not a number")


def test_memory_more_than_host(base: VmConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    too_much = ((host_memory() >> 12) + 1) << 12
    _fails(base.replace(memory=too_much), "more than this host has")
    monkeypatch.setattr(config_mod, "host_memory", lambda: 64 << 20)
    base.replace(memory=64 << 20).validate()
    _fails(base.replace(memory=(64 << 20) + 4096), "more than this host has (64 MiB)")


def test_host_memory_plausible() -> None:
    assert host_memory() >= 64 << 20
    assert host_memory() % 1024 == 0


@pytest.mark.parametrize("cpus", [1, 2, MAX_CPUS])
def test_cpus_ok(base: VmConfig, cpus: int) -> None:
    base.replace(cpus=cpus).validate()


def test_cpus_bad(base: VmConfig) -> None:
    assert MAX_CPUS == 254
    _fails(base.replace(cpus=0), "cpus", "at least 1")
    _fails(base.replace(cpus=-1), "cpus", "at least 1")
    _fails(base.replace(cpus=255), "255 vCPUs", "at most 254")
    _fails(base.replace(cpus=True), "cpus")
    _fails(base.replace(cpus=2.0), "cpus")


# -- validate: options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("boot", ["auto", "pvh", "linux64"])
def test_boot_modes_ok(base: VmConfig, boot: str) -> None:
    base.replace(boot=boot).validate()


@pytest.mark.parametrize("boot", ["", "AUTO", "bios", "linux"])
def test_boot_mode_bad(base: VmConfig, boot: str) -> None:
    _fails(base.replace(boot=boot), "boot mode", repr(boot))


def test_cpu_vendor(base: VmConfig) -> None:
    base.replace(cpu_vendor="GenuineIntel").validate()
    base.replace(cpu_vendor="AuthenticAMD").validate()
    _fails(base.replace(cpu_vendor="Intel"), "CPU vendor")
    _fails(base.replace(cpu_vendor="GenuineIntel!"), "CPU vendor")
    _fails(base.replace(cpu_vendor=""), "CPU vendor")
    _fails(base.replace(cpu_vendor="Genuine\u00efntel"), "CPU vendor")  # 12 characters, not ASCII


def test_rng_rate(base: VmConfig) -> None:
    base.replace(rng_rate=1).validate()
    _fails(base.replace(rng_rate=0), "rng rate")
    _fails(base.replace(rng_rate=-5), "rng rate")
    _fails(base.replace(rng_rate=1.5), "rng rate")
    _fails(base.replace(rng_rate=True), "rng rate")


@pytest.mark.parametrize("timeout", [0, 0.0, 1, 2.5, math.inf, 1e300, 10**30])
def test_timeout_ok(base: VmConfig, timeout: float) -> None:
    base.replace(timeout=timeout).validate()


@pytest.mark.parametrize("timeout", [-1, -0.001, -math.inf, math.nan, "10", True])
def test_timeout_bad(base: VmConfig, timeout: Any) -> None:
    _fails(base.replace(timeout=timeout), "timeout")


def test_boot_marker(base: VmConfig) -> None:
    base.replace(boot_marker=r"^Welcome to .*\d+").validate()
    base.replace(boot_marker="").validate()
    _fails(base.replace(boot_marker="(unclosed"), "boot marker", "not a regular expression")
    _fails(base.replace(boot_marker="[a-"), "boot marker")
    _fails(base.replace(boot_marker="a**"), "boot marker")
    _fails(base.replace(boot_marker="x\udcff"), "boot marker")


def test_cmdline_ok(base: VmConfig) -> None:
    base.replace(cmdline="").validate()
    base.replace(cmdline='console=ttyS0 foo="a b"').validate()
    base.replace(cmdline="a" * CMDLINE_LIMIT).validate()


def test_cmdline_bad(base: VmConfig) -> None:
    _fails(base.replace(cmdline="console=ttyS0 \0"), "command line", "NUL")
    _fails(base.replace(cmdline='console=ttyS0 foo="a b'), "command line", "unterminated")
    _fails(base.replace(cmdline="a" * (CMDLINE_LIMIT + 1)), "command line", f"at most {CMDLINE_LIMIT}")
    _fails(base.replace(cmdline="x=\udcff"), "command line", "UTF-8")
    # the limit counts bytes: 2-byte characters reach it with half as many
    _fails(base.replace(cmdline="\u00e9" * (CMDLINE_LIMIT // 2 + 1)), "command line")


# -- validate: disks -----------------------------------------------------------------------------------
def test_disks_ok(base: VmConfig, disk_a: Path, disk_b: Path) -> None:
    cfg = base.replace(disks=[f"{disk_a},ro,serial=a", disk_b], rootfs=None)
    cfg.validate()
    base.replace(rootfs=disk_a, disks=[disk_b]).validate()


def test_disk_missing(base: VmConfig, tmp_path: Path, disk_a: Path) -> None:
    _fails(base.replace(disks=[disk_a, tmp_path / "gone.img"]), "gone.img", "no such file")
    _fails(base.replace(rootfs=tmp_path / "gone.img"), "gone.img", "no such file")
    _fails(base.replace(disks=[tmp_path]), "not a regular file or block device")


def test_disk_bad_serial(base: VmConfig, disk_a: Path) -> None:
    _fails(base.replace(disks=[DiskSpec(disk_a, serial="s" * 21)]), "serial")


def test_disk_duplicate_same_path(base: VmConfig, disk_a: Path) -> None:
    _fails(base.replace(disks=[disk_a, disk_a]), "same image", "given twice")
    _fails(base.replace(disks=[disk_a, f"{disk_a},ro"]), "same image")


def test_disk_duplicate_via_symlink(base: VmConfig, tmp_path: Path, disk_a: Path, disk_b: Path) -> None:
    link = tmp_path / "link.img"
    link.symlink_to(disk_a)
    _fails(base.replace(disks=[disk_a, disk_b, link]), "same image", str(link), str(disk_a))


def test_disk_duplicate_via_hard_link(base: VmConfig, tmp_path: Path, disk_a: Path) -> None:
    hard = tmp_path / "hard.img"
    os.link(disk_a, hard)
    _fails(base.replace(disks=[disk_a, hard]), "same image")


def test_disk_duplicate_relative_and_absolute(
    base: VmConfig, tmp_path: Path, disk_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _fails(base.replace(disks=[disk_a, Path(disk_a.name)]), "same image")


def test_rootfs_is_a_disk(base: VmConfig, tmp_path: Path, disk_a: Path) -> None:
    _fails(base.replace(rootfs=disk_a, disks=[disk_a]), "same image")
    link = tmp_path / "root-link"
    link.symlink_to(disk_a)
    _fails(base.replace(rootfs=link, disks=[disk_a]), "same image")


# -- validate: outputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("console", ["none", "stdio"])
def test_console_simple(base: VmConfig, console: str) -> None:
    base.replace(console=console).validate()


@pytest.mark.parametrize("console", ["", "file", "tty", "STDIO", "/tmp/x.log", "pipe:x"])
def test_console_bad_spec(base: VmConfig, console: str) -> None:
    _fails(base.replace(console=console), "console", "stdio, none or file:PATH")


def test_console_file_ok(base: VmConfig, tmp_path: Path) -> None:
    base.replace(console=f"file:{tmp_path / 'new.log'}").validate()
    assert not (tmp_path / "new.log").exists()  # validate() creates nothing
    _file(tmp_path / "old.log", b"old")
    base.replace(console=f"file:{tmp_path / 'old.log'}").validate()
    assert (tmp_path / "old.log").read_bytes() == b"old"


def test_console_file_missing_directory(base: VmConfig, tmp_path: Path) -> None:
    _fails(base.replace(console=f"file:{tmp_path / 'no' / 'c.log'}"), "console file", "does not exist")


def test_console_file_is_directory(base: VmConfig, tmp_path: Path) -> None:
    _fails(base.replace(console=f"file:{tmp_path}"), "console file", "is a directory")


def test_console_file_not_writable(base: VmConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = _file(tmp_path / "c.log", b"")
    monkeypatch.setattr(config_mod.os, "access", lambda p, mode: not mode & os.W_OK)
    _fails(base.replace(console=f"file:{existing}"), "console file", "not writable")
    _fails(base.replace(console=f"file:{tmp_path / 'new.log'}"), "console file", "is not writable")


def test_metrics_path(base: VmConfig, tmp_path: Path) -> None:
    base.replace(metrics_path=tmp_path / "m.json").validate()
    _fails(base.replace(metrics_path=tmp_path / "no" / "m.json"), "metrics file", "does not exist")
    _fails(base.replace(metrics_path=tmp_path), "metrics file", "is a directory")


def test_console_and_metrics_distinct_ok(base: VmConfig, tmp_path: Path) -> None:
    base.replace(console=f"file:{tmp_path / 'c.log'}", metrics_path=tmp_path / "m.json").validate()


def _assert_refused_unchanged(cfg: VmConfig, victim: Path, *patterns: str) -> None:
    before = _sha(victim)
    size = victim.stat().st_size
    _fails(cfg, "refusing to overwrite", *patterns)
    assert _sha(victim) == before
    assert victim.stat().st_size == size


def test_console_file_is_kernel(base: VmConfig) -> None:
    cfg = base.replace(console=f"file:{base.kernel}")
    _assert_refused_unchanged(cfg, base.kernel, "console file", "kernel")


def test_console_file_is_kernel_via_symlink(base: VmConfig, tmp_path: Path) -> None:
    link = tmp_path / "console-link.log"
    link.symlink_to(base.kernel)
    _assert_refused_unchanged(base.replace(console=f"file:{link}"), base.kernel, "console file", "kernel")


def test_console_file_is_kernel_via_relative_path(
    base: VmConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = base.replace(console=f"file:./{base.kernel.name}")
    _assert_refused_unchanged(cfg, base.kernel, "kernel")


def test_console_file_is_initrd(base: VmConfig, tmp_path: Path) -> None:
    initrd = _file(tmp_path / "initrd", b"initrd data")
    _assert_refused_unchanged(base.replace(initrd=initrd, console=f"file:{initrd}"), initrd, "initrd")


def test_metrics_is_disk_image(base: VmConfig, disk_a: Path, disk_b: Path) -> None:
    cfg = base.replace(disks=[disk_b, disk_a], metrics_path=disk_a)
    _assert_refused_unchanged(cfg, disk_a, "metrics file", f"disk {disk_a}")


def test_metrics_is_rootfs_via_hard_link(base: VmConfig, tmp_path: Path, disk_a: Path) -> None:
    hard = tmp_path / "metrics.json"
    os.link(disk_a, hard)
    _assert_refused_unchanged(base.replace(rootfs=disk_a, metrics_path=hard), disk_a, "metrics file", "disk")


def test_metrics_is_kernel_via_symlink(base: VmConfig, tmp_path: Path) -> None:
    link = tmp_path / "m.json"
    link.symlink_to(base.kernel)
    _assert_refused_unchanged(base.replace(metrics_path=link), base.kernel, "metrics file", "kernel")


def test_console_is_metrics(base: VmConfig, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    cfg = base.replace(console=f"file:{out}", metrics_path=out)
    _fails(cfg, "refusing to overwrite", "console file", "metrics")
    assert not out.exists()
    _file(out, b"previous run")
    _assert_refused_unchanged(base.replace(console=f"file:{out}", metrics_path=out), out, "metrics")


def test_console_is_metrics_via_symlink(base: VmConfig, tmp_path: Path) -> None:
    out = _file(tmp_path / "out.txt", b"x")
    link = tmp_path / "out-link.txt"
    link.symlink_to(out)
    _assert_refused_unchanged(base.replace(console=f"file:{link}", metrics_path=out), out, "metrics")
    # a dangling symlink to the same new file
    new = tmp_path / "new.txt"
    link2 = tmp_path / "new-link.txt"
    link2.symlink_to(new)
    _fails(base.replace(console=f"file:{link2}", metrics_path=new), "refusing to overwrite")
    assert not new.exists()


def test_validate_is_pure(tmp_path: Path) -> None:
    """validate() reads the host's files and memory only: no /dev/kvm, and it writes nothing."""
    cfg = _full(tmp_path).replace(kvm_device=str(tmp_path / "no-kvm-here"))
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg.validate()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "changes",
    [
        {"kernel": "a\0b"},
        {"initrd": "i\0"},
        {"metrics_path": "m\0"},
        {"console": "file:c\0"},
        {"disks": ("d\0",)},
    ],
)
def test_a_nul_byte_in_a_path_is_a_config_error(tmp_path: Path, changes: dict[str, object]) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF" + bytes(100))
    config = VmConfig(kernel=kernel).replace(**changes)
    with pytest.raises(ConfigError, match="not a usable path"):
        config.validate()
