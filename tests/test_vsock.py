"""virtio-vsock and Firecracker's hybrid vsock on real Unix sockets, with a mock driver in place of the
guest (no KVM needed): the CONNECT protocol, guest-initiated connections, credit both ways, half-close,
and what a hostile guest or host client may send."""

from __future__ import annotations

import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from pyrovm.devices.virtio.vsock import (
    EVENT,
    HDR_SIZE,
    HEADER,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX,
    TX,
    Packet,
    VirtioVsock,
)
from pyrovm.errors import ConfigError
from pyrovm.memory import GuestMemory
from pyrovm.netback.vsock import BUF_ALLOC, FIRST_HOST_PORT, VsockMuxer

CID = 3
Rig = tuple[VsockMuxer, "Driver", "PumpLoop", Path]


class PumpLoop:
    """The event loop's watch and call_later, run by the test (:meth:`pump`)."""

    def __init__(self) -> None:
        self.watched: dict[int, tuple[Callable[[], None], bool, bool]] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None:
        if read or write:
            self.watched[fd] = (callback, read, write)
        else:
            self.watched.pop(fd, None)

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        self.timers.append((time.monotonic() + delay, fn))
        return None

    def pump(self, rounds: int = 20, timeout: float = 0.02) -> None:
        for _ in range(rounds):
            sel = selectors.DefaultSelector()
            for fd, (cb, r, w) in list(self.watched.items()):
                events = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
                try:
                    sel.register(fd, events, cb)
                except (ValueError, OSError):
                    self.watched.pop(fd, None)
            ready = sel.select(timeout)
            sel.close()
            for key, _ in ready:
                key.data()
            now = time.monotonic()
            due = [t for t in self.timers if t[0] <= now]
            self.timers = [t for t in self.timers if t[0] > now]
            for _, fn in due:
                fn()
            if not ready and not due:
                return


class Driver:
    """A mock vsock driver: 64 rx buffers re-posted in place, a tx queue, an event queue."""

    def __init__(self, mux: VsockMuxer, buf_alloc: int = 1 << 20) -> None:
        self.mem = GuestMemory.anonymous(16 << 20)
        self.rxq = MockSplitQueue(self.mem, size=64, base=0x1000, data_base=0x10000, data_size=0x200000)
        self.txq = MockSplitQueue(self.mem, size=64, base=0x300000, data_base=0x310000, data_size=0x800000)
        self.evq = MockSplitQueue(self.mem, size=16, base=0xC00000, data_base=0xC10000, data_size=0x1000)
        self.dev = VirtioVsock(CID, mux)
        self.dev.activate(self.mem, [self.rxq.queue(), self.txq.queue(), self.evq.queue()])
        self.dev.bind(lambda i: self.dev.process(i))
        self.rx_bufs = {}
        for _ in range(64):
            c = self.rxq.add_chain([], [HDR_SIZE + 4096])
            self.rx_bufs[c.head] = c.writable[0][0]
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.got: list[tuple[Packet, bytes]] = []

    def send(
        self, op: int, src_port: int, dst_port: int, data: bytes = b"", flags: int = 0, **kw: int
    ) -> None:
        hdr = dict(src_cid=CID, dst_cid=2, src_port=src_port, dst_port=dst_port, len=len(data), type=1, op=op,
                   flags=flags, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt)  # fmt: skip
        hdr.update(kw)
        self.txq.add_chain([HEADER.pack(*Packet(**hdr)) + data])
        self.dev.process(TX)

    def recv(self) -> list[tuple[Packet, bytes]]:
        self.dev.process(RX)
        out = []
        for head, n in self.rxq.take_used():
            raw = self.mem.read(self.rx_bufs[head], n)
            pkt = Packet._make(HEADER.unpack(raw[:HDR_SIZE]))
            out.append((pkt, raw[HDR_SIZE : HDR_SIZE + pkt.len]))
            self.rxq.write_desc(head, self.rx_bufs[head], HDR_SIZE + 4096, VIRTQ_DESC_F_WRITE)
            self.rxq.publish(head)
        self.got += out
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    loop = PumpLoop()
    path = tmp_path / "v.sock"
    mux = VsockMuxer(path, loop)
    drv = Driver(mux)
    yield mux, drv, loop, path
    mux.close()


def client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(2)
    return s


def closed(s: socket.socket) -> bool:
    """True when the peer closed *s* (EOF, or a reset when it closed with our bytes unread)."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def connect(rig: Rig, port: int = 5000) -> tuple[socket.socket, Packet]:
    _mux, drv, loop, path = rig
    c = client(path)
    c.sendall(f"CONNECT {port}\n".encode())
    loop.pump()
    [(req, _)] = [p for p in drv.recv() if p[0].op == OP_REQUEST]
    assert (req.src_cid, req.dst_cid, req.dst_port) == (2, CID, port) and req.src_port >= FIRST_HOST_PORT
    drv.send(OP_RESPONSE, port, req.src_port)
    return c, req


def test_host_connect_ok_and_data_both_ways(rig: Rig) -> None:
    mux, drv, loop, _ = rig
    c, req = connect(rig)
    assert c.recv(64) == f"OK {req.src_port}\n".encode()
    c.sendall(b"hello guest")
    loop.pump()
    [(pkt, data)] = drv.recv()
    assert (pkt.op, data, pkt.buf_alloc) == (OP_RW, b"hello guest", BUF_ALLOC)
    drv.send(OP_RW, 5000, req.src_port, b"hello host")
    assert c.recv(64) == b"hello host"
    assert mux.metrics()["bytes_to_host"] == 10 and mux.metrics()["bytes_to_guest"] == 11


def test_refused_and_unanswered_connects_close_the_client(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    mux, drv, loop, path = rig
    c = client(path)
    c.sendall(b"CONNECT 6000\n")
    loop.pump()
    [(req, _)] = drv.recv()
    drv.send(OP_RST, 6000, req.src_port)
    loop.pump()
    assert c.recv(64) == b""  # closed, no OK
    monkeypatch.setattr("pyrovm.netback.vsock.CONNECT_TIMEOUT", 0.05)
    c2 = client(path)
    c2.sendall(b"CONNECT 6001\n")
    loop.pump()
    [(req2, _)] = drv.recv()
    time.sleep(0.1)
    loop.pump()
    assert c2.recv(64) == b""
    assert any(p.op == OP_RST and p.src_port == req2.src_port for p, _ in drv.recv())  # the guest is told
    assert mux.conns == {}


@pytest.mark.parametrize(
    "line", [b"GARBAGE\n", b"CONNECT\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"CONNECT -1\n", b"A" * 40]
)
def test_malformed_connect_closes_that_client_only(rig: Rig, line: bytes) -> None:  # fmt: skip
    mux, _drv, loop, path = rig
    good, req = connect(rig)
    bad = client(path)
    bad.sendall(line)
    loop.pump()
    assert closed(bad)
    assert good.recv(64) == f"OK {req.src_port}\n".encode()  # the other connection is fine
    assert mux.metrics()["bad_clients"] == 1


def test_guest_initiated_to_listener_and_to_nobody(rig: Rig) -> None:
    _mux, drv, loop, path = rig
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{path}_7000")
    lst.listen()
    drv.send(OP_REQUEST, 1234, 7000)
    [(resp, _)] = drv.recv()
    assert (resp.op, resp.src_port, resp.dst_port) == (OP_RESPONSE, 7000, 1234)
    peer, _ = lst.accept()
    drv.send(OP_RW, 1234, 7000, b"from the guest")
    assert peer.recv(64) == b"from the guest"
    peer.sendall(b"from the host")
    loop.pump()
    assert [(p.op, d) for p, d in drv.recv()] == [(OP_RW, b"from the host")]
    drv.send(OP_REQUEST, 1235, 7001)  # nobody listens at PATH_7001
    [(rst, _)] = drv.recv()
    assert (rst.op, rst.dst_port) == (OP_RST, 1235)
    lst.close()


def test_guest_credit_is_never_exceeded(tmp_path: Path) -> None:
    loop = PumpLoop()
    mux = VsockMuxer(tmp_path / "v.sock", loop)
    drv = Driver(mux, buf_alloc=10000)
    c, req = connect((mux, drv, loop, tmp_path / "v.sock"))
    c.recv(64)
    c.sendall(bytes(range(256)) * 200)  # 51200 bytes, five times the guest's buffer
    loop.pump()
    got = b"".join(d for p, d in drv.recv() if p.op == OP_RW)
    assert len(got) == 10000  # exactly its credit
    conn = next(iter(mux.conns.values()))
    assert conn.tx_cnt - drv.fwd_cnt <= drv.buf_alloc
    assert any(p.op == OP_CREDIT_REQUEST for p, _ in drv.got)
    while len(got) < 51200:  # the guest consumes and says so: the rest follows, in order
        drv.fwd_cnt = len(got)
        drv.send(OP_CREDIT_UPDATE, 5000, req.src_port)
        loop.pump()
        more = b"".join(d for p, d in drv.recv() if p.op == OP_RW)
        assert more and conn.tx_cnt - drv.fwd_cnt <= drv.buf_alloc
        got += more
    assert got == bytes(range(256)) * 200
    mux.close()


def test_host_not_reading_stalls_only_its_connection(rig: Rig) -> None:
    mux, drv, loop, _path = rig
    slow, req = connect(rig)
    slow.recv(64)
    chunk = b"z" * 4096
    sent = 0
    while sent + len(chunk) <= BUF_ALLOC:  # the guest sends within its credit; the host does not read
        drv.send(OP_RW, 5000, req.src_port, chunk)
        sent += len(chunk)
    loop.pump()
    conn = mux.conns[(req.src_port, 5000)]
    assert conn.rx_cnt == sent and len(conn.out) + conn.fwd_cnt == sent  # nothing lost, bounded
    other, req2 = connect(rig, 5001)
    assert other.recv(64) == f"OK {req2.src_port}\n".encode()
    drv.send(OP_RW, 5001, req2.src_port, b"still moving")
    assert other.recv(64) == b"still moving"
    received = b""
    slow.settimeout(0.2)
    while len(received) < sent:
        try:
            received += slow.recv(1 << 20)
        except TimeoutError:
            loop.pump()
    assert received == chunk * (sent // len(chunk))


def test_guest_past_its_credit_is_reset(rig: Rig) -> None:
    mux, drv, _loop, _ = rig
    c, req = connect(rig)
    c.recv(64)
    drv.recv()
    conn = mux.conns[(req.src_port, 5000)]
    for _ in range(1000):  # an honest guest: exactly the credit it was told, until the host stops reading
        allowed = BUF_ALLOC - (conn.rx_cnt - conn.told_fwd)
        if not allowed:
            break
        drv.send(OP_RW, 5000, req.src_port, b"q" * min(allowed, 65536))
        assert OP_RST not in [p.op for p, _ in drv.recv()]
    assert conn.key in mux.conns and conn.rx_cnt - conn.told_fwd == BUF_ALLOC
    drv.send(OP_RW, 5000, req.src_port, b"q")  # one byte too many
    assert OP_RST in [p.op for p, _ in drv.recv()] and mux.conns == {}
    assert mux.stats.protocol_errors == 1


def test_half_close_both_ways(rig: Rig) -> None:
    mux, drv, loop, _ = rig
    c, req = connect(rig)
    c.recv(64)
    c.shutdown(socket.SHUT_WR)  # the host will send no more
    loop.pump()
    [(shut, _)] = drv.recv()
    assert (shut.op, shut.flags) == (OP_SHUTDOWN, 2)
    drv.send(OP_RW, 5000, req.src_port, b"last words")  # the guest may still send
    assert c.recv(64) == b"last words"
    drv.send(OP_SHUTDOWN, 5000, req.src_port, flags=2)  # and now it is done too: torn down
    assert c.recv(64) == b""
    assert [p.op for p, _ in drv.recv()] == [OP_RST] and mux.conns == {}


def test_guest_rst_closes_the_host_socket(rig: Rig) -> None:
    mux, drv, _, _ = rig
    c, req = connect(rig)
    c.recv(64)
    drv.send(OP_RST, 5000, req.src_port)
    assert c.recv(64) == b"" and mux.conns == {}


def test_hostile_guest_packets(rig: Rig) -> None:
    _mux, drv, _, _ = rig
    drv.send(OP_REQUEST, 1, 7000, src_cid=9)  # not the guest's CID
    drv.send(OP_REQUEST, 1, 7000, dst_cid=5)  # not to the host
    drv.txq.add_chain([HEADER.pack(CID, 2, 1, 7000, 500, 1, OP_RW, 0, 0, 0) + b"short"])  # len > payload
    drv.txq.add_chain([b"tiny"])  # shorter than a header
    drv.dev.process(TX)
    assert drv.dev.metrics()["dropped"] == 4 and drv.recv() == []
    drv.send(99, 1, 7000)  # unknown op
    drv.send(OP_REQUEST, 1, 7000, type=2)  # a seqpacket: not supported
    assert [p.op for p, _ in drv.recv()] == [OP_RST, OP_RST]
    drv.send(OP_RW, 1, 7000, b"data for nobody")
    assert [p.op for p, _ in drv.recv()] == [OP_RST]


def test_transport_reset_event_and_reset_closes_everything(rig: Rig) -> None:
    mux, drv, _, _ = rig
    c, _ = connect(rig)
    c.recv(64)  # OK
    ev = drv.evq.add_chain([], [4])
    assert drv.dev.transport_reset()
    assert drv.evq.take_used() == [(ev.head, 4)] and drv.mem.read(ev.writable[0][0], 4) == bytes(4)
    assert mux.conns == {} and c.recv(64) == b""
    assert drv.dev.queues[EVENT] is not None


def test_socket_path_that_exists_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_text("")
    with pytest.raises(ConfigError, match="already exists"):
        VsockMuxer(path, PumpLoop())
    assert path.read_text() == ""  # not touched


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat")
def test_socat_speaks_the_protocol(rig: Rig) -> None:
    _mux, drv, loop, path = rig
    proc = subprocess.Popen(
        ["socat", "-", f"UNIX-CONNECT:{path}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"CONNECT 5000\n")
    proc.stdin.flush()
    req = None
    for _ in range(100):
        loop.pump(rounds=1)
        reqs = [p for p, _ in drv.recv() if p.op == OP_REQUEST]
        if reqs:
            req = reqs[0]
            break
    assert req is not None
    drv.send(OP_RESPONSE, 5000, req.src_port)
    assert proc.stdout.readline() == f"OK {req.src_port}\n".encode()
    drv.send(OP_RW, 5000, req.src_port, b"hi socat\n")
    assert proc.stdout.readline() == b"hi socat\n"
    proc.stdin.close()  # socat half-closes, then ends
    for _ in range(100):
        loop.pump(rounds=1)
        if any(p.op == OP_SHUTDOWN for p, _ in drv.recv()):
            break
    drv.send(OP_SHUTDOWN, 5000, req.src_port, flags=3)
    assert proc.wait(5) == 0


def test_guest_close_with_data_the_host_has_not_read_loses_nothing(rig: Rig) -> None:
    mux, drv, loop, _ = rig
    c, req = connect(rig)
    c.recv(64)
    sent = b""
    conn = mux.conns[(req.src_port, 5000)]
    for i in range(200):  # more than the socket buffer takes while the host does not read
        allowed = BUF_ALLOC - (conn.rx_cnt - conn.told_fwd)
        if allowed < 4096:
            break
        data = bytes([i]) * 4096
        drv.send(OP_RW, 5000, req.src_port, data)
        sent += data
        drv.recv()
    assert conn.out  # some of it waits in the muxer
    drv.send(OP_SHUTDOWN, 5000, req.src_port, flags=3)  # the guest closes at once
    got = b""
    c.settimeout(0.2)
    while True:
        try:
            chunk = c.recv(1 << 20)
        except TimeoutError:
            loop.pump()
            continue
        if not chunk:
            break
        got += chunk
    assert got == sent and mux.conns == {}
    assert OP_RST in [p.op for p, _ in drv.recv()]
