"""Fuzzing with atheris (issue "Defence in depth", item 3): every harness of ``fuzz/`` runs for a fixed
time in a subprocess of its own, on a copy of its seed corpus, and must end without a crash, a hang
(libFuzzer's ``-timeout``) or running out of memory (``-rss_limit_mb``); then every input that once
crashed a harness (:data:`REGRESSIONS`, also ``fuzz/corpus/*/crash-*``) is fed to it in this process and
must not raise.

``PYROVM_FUZZ_SECONDS`` sets each harness's time (default 4); deselect with ``-m "not fuzz"``.  A longer
run of one harness, by hand (its corpus grows in place)::

    .venv/bin/python fuzz/fuzz_virtqueue.py -max_total_time=600 fuzz/corpus/virtqueue
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from conftest import cli_env

pytest.importorskip("atheris", reason="atheris is not installed (pip install 'atheris>=2.3')")

pytestmark = pytest.mark.fuzz

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
SECONDS = int(os.environ.get("PYROVM_FUZZ_SECONDS", "4"))
#: each target's harness is fuzz/fuzz_<target>.py and its seeds are in fuzz/corpus/<target>/
TARGETS = [
    "virtqueue",
    "virtio_mmio",
    "virtio_rng",
    "virtio_blk",
    "virtio_net",
    "virtio_vsock",
    "api_http",
    "api_controller",
    "fc_config",
    "snapshot",
    "loader",
    "cpio",
    "qemu",
]


def test_every_harness_has_a_target_and_seeds() -> None:
    assert sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py")) == sorted(TARGETS)
    for target in TARGETS:
        seeds = list((FUZZ / "corpus" / target).iterdir())
        assert seeds, target
        assert sum(p.stat().st_size for p in seeds) < 64 * 1024, f"{target}: keep the seed corpus small"


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)  # the fuzzer adds to it: not to the repository's
    argv = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        f"-max_total_time={SECONDS}",
        "-timeout=10",  # a single input running longer is a hang
        "-rss_limit_mb=1024",
        f"-artifact_prefix={tmp_path}/",  # where a crashing input is written
        str(corpus),
    ]
    proc = subprocess.run(
        argv,
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 120,
    )
    out = proc.stdout + proc.stderr
    crashed = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert proc.returncode == 0, f"exit status {proc.returncode}, {crashed}:\n{out[-8000:]}"
    assert "ERROR: libFuzzer" not in out, out[-8000:]
    assert "Uncaught Python exception" not in out, out[-8000:]
    assert "Done " in out, out[-8000:]


#: Inputs that crashed a harness (each is also ``fuzz/corpus/<target>/crash-<name>``), with the fix in src/:
#: fed to the harness's ``fuzz_one`` here, in this process, they must not raise.
REGRESSIONS: list[tuple[str, str, bytes]] = [
    # SplitQueue.drain: rings laid over each other, so that each used entry the device adds makes a new avail
    # entry: drain() never returned (its work budget was per batch, not per call): the I/O thread hung
    (
        "virtqueue",
        "drain-never-ends",
        bytes.fromhex("ffffffffffff01000000000000000100ef01000000000000000a66"),
    ),
    # virtio-net on a stream (passt): the peer gone, end_batch()'s flush raised BackendClosedError out of the
    # device (DEVICE_NEEDS_RESET) instead of taking the link down
    (
        "virtio_net",
        "stream-peer-gone-at-end-of-batch",
        b"A\x01A\x01!*A$\xff\xff\xff*\x00*\xf6\x01\x00\x00\x00\x01!*A$\xff\xff\xff*\x00*\xf6\x01\x00\x00\x00\xf6*"
        b"\x00A/\xff\xff\xf6*\x00A/\xff\xff\xff",
    ),
    # VirtioVsock.transport_reset() (run by the event loop after a restore) let a broken event queue's
    # AvailIndexError out
    (
        "virtio_vsock",
        "transport-reset-on-broken-event-queue",
        b"\x01"
        + bytes(7)
        + b"\xff\xfe\xde\xde\xde\xde\x00\xde\xde\x00\xad\xde\xde\xde\x00\xde\xde\x00mmm\xf2\xf23\xf2\xffMMM"
        b"\xf2\xf2\xf2l\xad\xf7@\xad\xde\xde\xde\x00\xde\xde\x00mmm\xf2\xf23\xf2\xffMMM\xff\xf7\xff\xff\xff\x00\x00",
    ),
    # virtio-rng filled a buffer with os.getrandom(n), which returns fewer bytes when a signal comes (as
    # libFuzzer's timer did): a ValueError out of the device (replayed with short getrandom() results below)
    (
        "virtio_rng",
        "short-getrandom",
        b"\xff\xff\xff\xff@\x01\xff@,!mm\xcd@f\x01\xf3\xf3\xf3\xf3)\xf3"
        + bytes(8)
        + b"\xf3\xf3\xf3\xf3\x01\xff@,!fm"
        + b"\xf3" * 9
        + b"\x01\xf3\xf3\xf3\xf3)\xf3\xf3\x00.m\xcd\x0fm@\x1d\xff@,!f+m\x00mm\xcd\x0fm@"
        + b"\x1d" * 6,
    ),
    # a body nested deeper than the recursion limit: RecursionError killed the connection thread (no answer)
    (
        "api_http",
        "json-body-nested-too-deep",
        b"PUT /vsock HTTP/1.1\r\nContent-Length: 1200\r\n\r\n" + b"[" * 1200,
    ),
    # PUT /snapshot/load {"snapshot_path": "\ud800"}: open() raised UnicodeEncodeError (an internal error)
    (
        "api_controller",
        "snapshot-path-unpaired-surrogate",
        b"\xff" * 11 + b"\xdb\xfb\xef2\xff\x95\xff\x95\x95\xff\xdb\x95\x95\x95\x95\x17",
    ),
    # PUT /vsock {"uds_path": "...\udc67"}, then InstanceStart: os.fsencode raised in VsockSpec.validate
    (
        "api_controller",
        "vsock-uds-path-unpaired-surrogate",
        b")g"
        + b"\x86" * 48
        + b"9gggg\xdcgggggg'g))"
        + b"\xff" * 8
        + b"\x0e\x0e&\x0e\x0e\x0ew\x0ez\xf9\xf9\xf9\xf9www\xff"
        b"\xff\xfbG))))'\xcb)))))\xf2\xff\xff\xd6\x00\x01E)\xda\xff\x00\xfb)())"
        + b"\x07" * 27
        + b"\x92"
        + b"\x07" * 13
        + b"))))",
    ),
    # PUT /network-interfaces/eth0 {"host_dev_name": "\ud800"}, InstanceStart: check_ifname's encode() raised
    (
        "api_controller",
        "tap-name-unpaired-surrogate",
        b"\xc5\x9bIgstanceStartgg)):g))B)'\xcb)+))%)\xcb))))'g)())B)'\xcb\xa9+))))'\xcb)))))\x97\x00\x00))\xdaz)"
        b"\xff\xff\xff\xff\xbf\x00\x00SS\xfb\xfb"
        + b"\xc8" * 6
        + b"\xfb\xeb\xfbSNS\xeb\xeb"
        + b"A" * 59
        + b"\xeb5\xc5M#",
    ),
    # snapshot load, network_overrides [{"iface_id": "eth\u00b2"}]: "\u00b2".isdigit(), int() refuses it
    (
        "api_controller",
        "network-override-superscript-digit",
        b"\xfd\xff\xffww\xff\xff\xff"
        + bytes(7)
        + b"\x03"
        + b"\xff" * 7
        + b"U\xb9g\xb9\xb9\xb9\xb9"
        + b"\xff" * 7
        + b"\x01\xb9\x10\x9a\x07A\x9a\x9a\xba\x9a\x9a\x9aA\x8a\xd5w\xff\xffw\x0e]\x0e&\x7fww\n",
    ),
    # a config file nested deeper than the recursion limit: RecursionError, not apply_config_file's ValueError
    ("fc_config", "json-nested-too-deep", b"[" * 1200),
    # a state file (good checksum) whose JSON is nested too deep: RecursionError, not SnapshotError
    ("snapshot", "json-nested-too-deep", b"\x01" + b"[" * 1200),
    # a state file whose saved API resources are not objects: AttributeError in the API's replay of them
    (
        "snapshot",
        "saved-api-resources-not-objects",
        b"A{\x84\x85{"
        + b"\x99" * 14
        + bytes(3)
        + b"\x99" * 4
        + b"\xff" * 6
        + b"PYROSNA\x99\x99{{\x84\x84\x84\x84\x84",
    ),
    # `pyrovm initramfs --add DIR:/x` with a host file name that is not UTF-8: UnicodeEncodeError
    ("cpio", "host-file-name-not-utf8", b">\xd3+\x01\x00\x00\x00@"),
    # `pyrovm initramfs --add` with a NUL byte in the host path: ValueError from os.stat
    (
        "cpio",
        "host-path-with-nul",
        b"\xb2\x92\x85&\xc9\xaf\xaf\xaf\xaf\xaf\x01\x00\x00\x00@\x0f\r\xba\xaf)\xc9\x91\xb2\x92\x85&\xc9\xaf\xaf\xaf\xaf\xaf\xaf)\xc9\x91\x85\x81\x01\x01\x85\x01\x00\x00\x00\x00\x00\x00\x13",
    ),
    # pyrovm qemu: ValueError / IndexError / OverflowError instead of QemuArgError
    ("qemu", "cpu-empty-feature", b"-kernel\0k\0-cpu\0host,"),
    ("qemu", "debug-exit-iobase-not-a-number", b"-kernel\0k\0-device\0isa-debug-exit,iobase=0xfz"),
    ("qemu", "memory-nan", b"-kernel\0k\0-m\0nan"),
    ("qemu", "memory-infinite", b"-kernel\0k\0-m\x001e400"),
    ("qemu", "smp-superscript-digit", "-kernel\0k\0-smp\0cpus=\u00b2".encode()),
    ("qemu", "vsock-cid-superscript-digit", "-kernel\0k\0-device\0vhost-vsock-pci,guest-cid=\u00b2".encode()),
    (
        "qemu",
        "net-mtu-superscript-digit",
        "-kernel\0k\0-netdev\0user,id=n\0-device\0virtio-net-pci,netdev=n,mac=x,,mtu=\u00b2".encode(),
    ),
    (
        "qemu",
        "hostfwd-port-superscript-digit",
        "-kernel\0k\0-netdev\0user,id=n,hostfwd=tcp::\u00b2-:22\0-device\0virtio-net-pci,netdev=n".encode(),
    ),
]


@pytest.fixture
def harnesses(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Import harnesses from fuzz/ (not instrumented: they instrument only when run as the fuzzer)."""
    monkeypatch.syspath_prepend(str(FUZZ))
    return lambda target: importlib.import_module(f"fuzz_{target}")


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError("the input hangs its harness")


@pytest.mark.parametrize(("target", "name", "data"), REGRESSIONS, ids=[f"{t}-{n}" for t, n, _ in REGRESSIONS])
def test_crash_input_no_longer_crashes(
    target: str, name: str, data: bytes, harnesses: Callable[[str], ModuleType]
) -> None:
    assert (FUZZ / "corpus" / target / f"crash-{name}").read_bytes() == data, "keep the input in the corpus"
    harness = harnesses(target)
    previous = signal.signal(signal.SIGALRM, _alarm)  # (the drain bug hung: a hang fails the test, not CI)
    signal.alarm(30)
    try:
        harness.fuzz_one(data)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_rng_short_getrandom(harnesses: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch) -> None:
    """The virtio-rng crash needs a short os.getrandom() result, which a signal causes: made here."""
    getrandom = os.getrandom
    monkeypatch.setattr(os, "getrandom", lambda n, flags=0: getrandom(max(n // 2, 1), flags))
    data = next(d for t, n, d in REGRESSIONS if n == "short-getrandom")
    harnesses("virtio_rng").fuzz_one(data)


def test_every_crash_input_in_the_corpus_is_a_regression_test() -> None:
    names = {f"{t}/crash-{n}" for t, n, _ in REGRESSIONS}
    assert {f"{p.parent.name}/{p.name}" for p in FUZZ.glob("corpus/*/crash-*")} == names
