"""--net specs: parsing, validation, default MACs, JSON, and the CLI's one-line errors (no KVM needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyrovm.config import NetSpec, VmConfig, default_mac
from pyrovm.devices.virtio.net import format_mac, parse_mac
from pyrovm.errors import ConfigError
from pyrovm.netback.passt import PortForward, parse_forward
from pyrovm.netback.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, offload_flags

from conftest import cli_env, pyrovm_argv


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF" + bytes(60))
    return k


def test_parse_tap_and_user() -> None:
    tap = NetSpec.parse("tap=tap0,mac=02:11:22:33:44:55,mtu=9000")
    assert (tap.backend, tap.tap, tap.mac, tap.mtu, tap.hostfwd) == (
        "tap",
        "tap0",
        "02:11:22:33:44:55",
        9000,
        (),
    )
    user = NetSpec.parse("user,hostfwd=tcp::2222-:22,hostfwd=udp:0.0.0.0:5353-:53")
    assert user.backend == "user" and user.tap is None and user.mtu == 1500
    assert user.hostfwd == (
        PortForward("tcp", "127.0.0.1", 2222, 22),
        PortForward("udp", "0.0.0.0", 5353, 53),
    )
    assert user.hostfwd[0].passt_args() == ["-t", "127.0.0.1/2222:22"]
    assert str(user.hostfwd[1]) == "udp:0.0.0.0:5353-:53"
    assert parse_forward("tcp:[::1]:8080-:80") == PortForward("tcp", "::1", 8080, 80)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bridge=br0", "use tap=NAME"),
        ("tap=tap0,speed=10", "unknown option 'speed=10'"),
        ("tap=tap0,hostfwd=tcp::1-:2", "unknown option 'hostfwd=tcp::1-:2'"),
        ("tap=tap0,mtu=big", "mtu 'big' is not a number"),
        ("user,hostfwd=icmp::1-:2", "starts with tcp: or udp:"),
        ("user,hostfwd=tcp:2222:22", "use tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"),
        ("user,hostfwd=tcp::99999-:22", "host port '99999' is not a number from 1 to 65535"),
        ("user,hostfwd=tcp::22-:0", "guest port '0'"),
        ("user,hostfwd=tcp:localhost:22-:22", "host address 'localhost' is not an IP address"),
        ("user,hostfwd=tcp::2222-10.0.2.15:22", "a guest address is not supported"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        NetSpec.parse(spec)


@pytest.mark.parametrize(
    "mac, message",
    [
        ("02:11:22:33:44", "six two-digit hex bytes"),
        ("02:11:22:33:44:5g", "six two-digit hex bytes"),
        ("0211.2233.4455", "six two-digit hex bytes"),
        ("01:00:5e:00:00:01", "multicast"),
        ("00:00:00:00:00:00", "all zeroes"),
    ],
)
def test_malformed_mac(kernel: Path, mac: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mac(mac)
    with pytest.raises(ConfigError, match=message):
        VmConfig(kernel, net=(f"tap=tap0,mac={mac}",)).validate()


def test_validation_errors(kernel: Path) -> None:
    cases = [
        (
            ("tap=tap0,mac=02:00:00:00:00:01", "tap=tap1,mac=02:00:00:00:00:01"),
            "MAC 02:00:00:00:00:01 is also NIC 0",
        ),
        (("tap=tap0", "tap=tap0"), "tap tap0 is given twice"),
        (("tap=" + "x" * 16,), "1 to 15 characters"),
        (("tap=a/b",), "no '/'"),
        (("tap=tap0,mtu=67",), "mtu 67: from 68 to 65535"),
        (("user,mtu=65521",), "mtu 65521: from 68 to 65520"),
        (("user,hostfwd=tcp::2222-:22", "user,hostfwd=tcp::2222-:23"), "forwarded twice"),
    ]
    for net, message in cases:
        with pytest.raises(ConfigError, match=message):
            VmConfig(kernel, net=net).validate()
    with pytest.raises(ConfigError, match="VM name"):
        VmConfig(kernel, name="").validate()


def test_default_mac_stable_local_unicast_and_distinct(kernel: Path) -> None:
    a = default_mac("web", 0)
    assert a == default_mac("web", 0)  # the same across runs
    assert a[0] & 0b11 == 0b10  # locally administered, unicast
    assert len({a, default_mac("web", 1), default_mac("db", 0)}) == 3
    cfg = VmConfig(kernel, net=("tap=tap0", "tap=tap1,mac=02:aa:bb:cc:dd:ee"), name="web")
    assert cfg.net[0].mac_bytes(cfg.name, 0) == a
    assert format_mac(cfg.net[1].mac_bytes(cfg.name, 1)) == "02:aa:bb:cc:dd:ee"


def test_net_json_round_trip_and_refusals(kernel: Path) -> None:
    cfg = VmConfig(kernel, net=("tap=tap0,mtu=9000", "user,hostfwd=tcp::2222-:22"), name="x")
    assert VmConfig.from_json(cfg.to_json()) == cfg
    data = cfg.to_json()
    data["net"][0]["speed"] = 10
    with pytest.raises(ConfigError, match="unknown field"):
        VmConfig.from_json(data)
    data["net"][0] = {"backend": "tap", "tap": "tap0", "mtu": "9000"}
    with pytest.raises(ConfigError, match="net mtu"):
        VmConfig.from_json(data)


def test_passt_missing_names_the_package(kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        ConfigError, match=r"passt, which is not installed \(Debian/Ubuntu: apt-get install passt\)"
    ):
        VmConfig(kernel, net=("user",)).validate()


def test_offload_flags_follow_guest_features() -> None:
    assert offload_flags(0) == 0
    assert offload_flags(1 << 7) == 0  # TSO without checksum offload: none
    assert offload_flags(1 << 1) == TUN_F_CSUM
    everything = (1 << 1) | (1 << 7) | (1 << 8) | (1 << 10)
    assert offload_flags(everything) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO


@pytest.mark.parametrize(
    "net, message",
    [
        ("tap=tap0,mac=zz", "MAC address 'zz'"),
        ("user,hostfwd=tcp:2222:22", "hostfwd=tcp:2222:22"),
        ("tap=tap0,bogus=1", "unknown option 'bogus=1'"),
    ],
)
def test_cli_bad_net_one_line_status_2(kernel: Path, net: str, message: str) -> None:
    proc = subprocess.run(
        pyrovm_argv("run", "--kernel", str(kernel), "--net", net),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
