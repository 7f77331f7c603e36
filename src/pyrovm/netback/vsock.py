"""The host side of virtio-vsock, as Firecracker does it (its ``docs/vsock.md``): Unix sockets.

* Host-initiated: a client connects to the VM's socket ``PATH`` and writes ``CONNECT <port>\\n``; the
  muxer sends the guest a REQUEST from host port ``2**30 + n`` and, once the guest answers with RESPONSE,
  writes ``OK <host_port>\\n`` to the client; from then on the connection is a byte stream.  A refused
  (RST) or unanswered (:data:`CONNECT_TIMEOUT`) request, or a malformed ``CONNECT`` line (garbage, no
  newline within :data:`MAX_CONNECT_LINE` bytes or :data:`CONNECT_TIMEOUT` seconds, a port out of range),
  closes that client only.
* Guest-initiated: a guest connection to CID 2 port P is forwarded to the Unix socket ``PATH_P``; when
  nothing listens there the guest gets RST.

Flow control follows the virtio-vsock credit rules both ways: the muxer never sends a connection more
than the guest's ``buf_alloc - (tx_cnt - fwd_cnt)``, reading the host socket only while there is credit
(so a guest that stops reading stalls only its own connection), and it advertises
:data:`BUF_ALLOC` bytes per connection, sending CREDIT_UPDATE as the host socket takes the data.  Data a
host client does not read waits in a per-connection buffer that the guest's credit bounds; a guest
that sends beyond its credit gets RST.  At most :data:`MAX_CONNECTIONS` connections (and clients still
in their ``CONNECT`` line) at once.  Half-closes map to SHUTDOWN and back; closing either side tears down
the other.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pyrovm.devices.virtio.queue import scatter, split_views
from pyrovm.devices.virtio.vsock import (
    HDR_SIZE,
    HEADER,
    HOST_CID,
    MAX_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Packet,
)
from pyrovm.errors import ConfigError, PyrovmError

log = logging.getLogger("pyrovm.vsock")

BUF_ALLOC = 256 * 1024
MAX_CONNECTIONS = 1023
MAX_CONNECT_LINE = 32
CONNECT_TIMEOUT = 5.0
FIRST_HOST_PORT = 1 << 30


class Loop(Protocol):
    """What the muxer needs of the event loop."""

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...


@dataclass
class Conn:
    """One connection: host port and guest port, its Unix socket, counters and buffers."""

    host_port: int
    guest_port: int
    sock: socket.socket
    established: bool = False
    rx_cnt: int = 0  # bytes received from the guest
    fwd_cnt: int = 0  # of those, bytes written to the host socket
    told_fwd: int = 0  # fwd_cnt as the guest last heard it
    tx_cnt: int = 0  # bytes sent to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    out: bytearray = field(default_factory=bytearray)  # guest data the host socket did not take yet
    host_eof: bool = False  # the host will send no more
    guest_shut: int = 0  # SHUTDOWN flags the guest sent
    readable: bool = False  # the host socket may have data (and is in the ready queue)
    credit_asked: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


@dataclass
class MuxStats:
    connections: int = 0  # opened, in total
    host_connects: int = 0
    guest_connects: int = 0
    refused: int = 0  # RSTs sent for connections nobody takes
    bad_clients: int = 0  # malformed CONNECT lines, timeouts
    protocol_errors: int = 0  # guest packets against the rules (credit exceeded, unknown op/type)
    bytes_to_guest: int = 0
    bytes_to_host: int = 0


class HostClients:
    """The VM's listening socket and the host clients still in their ``CONNECT <port>`` line.

    *wrap(fn)* wraps event-loop callbacks (the muxer's lock); *connected(sock, port, early)* takes a client
    whose line was valid; *accepting()* says whether a new client may be taken at all.
    """

    def __init__(
        self,
        path: Path,
        loop: Loop,
        wrap: Callable[[Callable[[], None]], Callable[[], None]],
        connected: Callable[[socket.socket, int, bytes], None],
        accepting: Callable[[], bool],
    ) -> None:
        self.path = path
        self.loop = loop
        self._cb = wrap
        self._connected = connected
        self._accepting = accepting
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}
        self.bad = 0
        self._logged = False
        self._listener = _listen(path)
        loop.watch(self._listener.fileno(), self._cb(self._accept), read=True, write=False)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:  # (EAGAIN: another accept took it)
            return
        if not self._accepting():  # too many, or no guest driver yet
            sock.close()
            return
        sock.setblocking(False)
        fd = sock.fileno()
        self.pending[fd] = (sock, bytearray())
        self.loop.watch(fd, self._cb(lambda: self._line(fd)), read=True, write=False)
        self.loop.call_later(CONNECT_TIMEOUT, self._cb(lambda: self._timeout(fd, sock)))

    def _timeout(self, fd: int, sock: socket.socket) -> None:
        entry = self.pending.get(fd)
        if entry is not None and entry[0] is sock:
            self._bad(fd, "no CONNECT line in time")

    def _bad(self, fd: int, why: str) -> None:
        sock, _ = self.pending.pop(fd)
        self.bad += 1
        if not self._logged:
            self._logged = True
            log.warning("vsock: closing a host client: %s (further occurrences not logged)", why)
        self.loop.watch(fd, _nothing, read=False, write=False)
        sock.close()

    def _line(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is None:
            return
        sock, buf = entry
        try:
            data = sock.recv(MAX_CONNECT_LINE + 1 - len(buf))  # never past the line's bound
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._bad(fd, "closed before its CONNECT line")
            return
        buf += data
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_CONNECT_LINE:
                self._bad(fd, "CONNECT line too long")
            return
        line, rest = bytes(buf[:nl]), bytes(buf[nl + 1 :])
        port = _connect_port(line)
        if port is None:
            self._bad(fd, f"malformed CONNECT line {line[:MAX_CONNECT_LINE]!r}")
            return
        del self.pending[fd]
        self.loop.watch(fd, _nothing, read=False, write=False)
        self._connected(sock, port, rest)

    def drop_all(self) -> None:
        for fd in list(self.pending):
            sock, _ = self.pending.pop(fd)
            self.loop.watch(fd, _nothing, read=False, write=False)
            sock.close()

    def close(self) -> None:
        self.drop_all()
        self.loop.watch(self._listener.fileno(), _nothing, read=False, write=False)
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


class _MuxerCore:
    """The muxer's state and bookkeeping: connections, the control packets waiting for the guest, the host
    clients, closing.  :class:`VsockMuxer` adds the protocol."""

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        loop: Loop,
        connected: Callable[[socket.socket, int, bytes], None],
    ) -> None:
        self.path = Path(uds_path)
        self.loop = loop
        self.stats = MuxStats()
        self.guest_cid = 0
        self._wake: Callable[[], None] | None = None
        self._locked: Callable[[Callable[[], None]], None] = _call
        self._busy = False  # inside send_pkt/recv_pkt: the device looks at the rx queue itself after
        self.conns: dict[tuple[int, int], Conn] = {}
        self._control: collections.deque[tuple[Packet, bytes]] = collections.deque()
        self._ready: collections.deque[Conn] = collections.deque()
        self._next_port = FIRST_HOST_PORT
        self._logged: set[str] = set()
        self._bad_connects = 0
        self.clients = HostClients(self.path, loop, self._cb, connected, self._accepting)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("vsock: " + msg + " (further occurrences not logged)", *args)

    def metrics(self) -> dict[str, int]:
        self.stats.bad_clients = self.clients.bad + self._bad_connects
        return {**self.stats.__dict__, "open_connections": len(self.conns)}

    def connections(self) -> list[dict[str, int]]:
        """Per open connection: its ports, bytes each way, bytes waiting for the host to read them."""
        return [
            {"host_port": c.host_port, "guest_port": c.guest_port, "bytes_to_guest": c.tx_cnt,
             "bytes_to_host": c.fwd_cnt, "waiting_for_host": len(c.out)}
            for c in self.conns.values()
        ]  # fmt: skip

    def attach(
        self, guest_cid: int, wake_rx: Callable[[], None], locked: Callable[[Callable[[], None]], None]
    ) -> None:
        self.guest_cid = guest_cid
        self._wake = wake_rx
        self._locked = locked

    def _cb(self, fn: Callable[[], None]) -> Callable[[], None]:
        """An event-loop callback, run serialised with the device (see :meth:`attach`)."""
        return lambda: self._locked(fn)

    def _wake_rx(self) -> None:
        if self._wake is not None and not self._busy:
            self._wake()

    def _queue(
        self, op: int, host_port: int, guest_port: int, flags: int = 0, conn: Conn | None = None
    ) -> None:
        fwd = conn.fwd_cnt if conn is not None else 0
        if conn is not None:
            conn.told_fwd = fwd
        pkt = Packet(
            HOST_CID, self.guest_cid, host_port, guest_port, 0, TYPE_STREAM, op, flags, BUF_ALLOC, fwd
        )
        self._control.append((pkt, b""))
        self._wake_rx()

    def _rst(self, host_port: int, guest_port: int) -> None:
        self.stats.refused += 1
        self._queue(OP_RST, host_port, guest_port)

    def _full(self) -> bool:
        return len(self.conns) + len(self.clients.pending) >= MAX_CONNECTIONS

    def _accepting(self) -> bool:
        """Whether a new host client may be taken (a guest driver is live, below the connection bound)."""
        return self._wake is not None and not self._full()

    # -- closing ---------------------------------------------------------------------------------------
    def _close(self, conn: Conn) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        try:
            self.loop.watch(conn.sock.fileno(), _nothing, read=False, write=False)
        except (OSError, ValueError):
            pass
        conn.sock.close()
        conn.readable = False

    def reset(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.clients.drop_all()
        self._control.clear()
        self._ready.clear()

    def close(self) -> None:
        self.reset()
        self.clients.close()


class VsockMuxer(_MuxerCore):
    """Connections between guest ports and Unix sockets at *uds_path* (see the module doc)."""

    def __init__(self, uds_path: str | os.PathLike[str], loop: Loop) -> None:
        super().__init__(uds_path, loop, self._host_connect)

    # -- host clients ----------------------------------------------------------------------------------
    def _host_connect(self, sock: socket.socket, port: int, early: bytes) -> None:
        """A host client's valid ``CONNECT <port>`` line: ask the guest (REQUEST) and wait for it."""
        conn = Conn(self._alloc_port(), port, sock)
        conn.out += early  # bytes sent right after the line: the guest gets them after OK
        self.conns[conn.key] = conn
        self.stats.host_connects += 1
        self._queue(OP_REQUEST, conn.host_port, port, conn=conn)
        key = conn.key
        self.loop.call_later(CONNECT_TIMEOUT, self._cb(lambda: self._connect_timeout(key, sock)))

    def _alloc_port(self) -> int:
        while True:
            port = self._next_port
            self._next_port = FIRST_HOST_PORT if port >= 0xFFFFFFFF else port + 1
            if not any(k[0] == port for k in self.conns):
                return port

    def _connect_timeout(self, key: tuple[int, int], sock: socket.socket) -> None:
        conn = self.conns.get(key)
        if conn is not None and conn.sock is sock and not conn.established:
            self._bad_connects += 1
            self._queue(OP_RST, conn.host_port, conn.guest_port)
            self._close(conn)

    # -- packets from the guest ------------------------------------------------------------------------
    def send_pkt(self, pkt: Packet, payload: list[memoryview]) -> None:
        self._busy = True
        try:
            self._from_guest(pkt, payload)
        finally:
            self._busy = False

    def _from_guest(self, pkt: Packet, payload: list[memoryview]) -> None:
        if pkt.type != TYPE_STREAM or not OP_REQUEST <= pkt.op <= OP_CREDIT_REQUEST:
            self.stats.protocol_errors += 1
            self._log_once("op", "packet of type %d op %d: answered with RST", pkt.type, pkt.op)
            if pkt.op != OP_RST:
                self._rst(pkt.dst_port, pkt.src_port)
            return
        conn = self.conns.get((pkt.dst_port, pkt.src_port))
        if pkt.op == OP_REQUEST:
            self._guest_connect(pkt, conn)
            return
        if conn is None:
            if pkt.op != OP_RST:
                self._rst(pkt.dst_port, pkt.src_port)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        if pkt.op == OP_RW:
            self._guest_data(conn, payload)
        elif pkt.op == OP_RESPONSE:
            self._established(conn)
        elif pkt.op == OP_RST:
            self._close(conn)
            return
        elif pkt.op == OP_SHUTDOWN:
            self._guest_shutdown(conn, pkt.flags)
            return
        elif pkt.op == OP_CREDIT_REQUEST:
            self._queue(OP_CREDIT_UPDATE, conn.host_port, conn.guest_port, conn=conn)
        self._maybe_read(conn)

    def _guest_connect(self, pkt: Packet, conn: Conn | None) -> None:
        if conn is not None or self._full():
            self._rst(pkt.dst_port, pkt.src_port)
            return
        target = f"{self.path}_{pkt.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(target)
        except OSError:  # nobody listens there (or its backlog is full)
            sock.close()
            self._rst(pkt.dst_port, pkt.src_port)
            return
        conn = Conn(pkt.dst_port, pkt.src_port, sock, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        self.conns[conn.key] = conn
        self.stats.guest_connects += 1
        self.stats.connections += 1
        self._queue(OP_RESPONSE, conn.host_port, conn.guest_port, conn=conn)
        self._maybe_read(conn)

    def _established(self, conn: Conn) -> None:
        if conn.established:
            return
        conn.established = True
        self.stats.connections += 1
        early, conn.out = bytes(conn.out), bytearray()
        reply = f"OK {conn.host_port}\n".encode()
        try:
            conn.sock.send(reply)  # a fresh socket's buffer takes a short line
        except OSError:
            self._queue(OP_RST, conn.host_port, conn.guest_port)
            self._close(conn)
            return
        if early:  # data the client sent right after its CONNECT line: the guest gets it now
            self._control.append((self._rw_header(conn, len(early)), early))
            conn.tx_cnt += len(early)
            self._wake_rx()

    def _guest_data(self, conn: Conn, payload: list[memoryview]) -> None:
        n = sum(v.nbytes for v in payload)
        if not n:
            return
        if not conn.established or conn.guest_shut & SHUTDOWN_SEND:
            self._protocol_error(conn, "data on a connection that is not open for it")
            return
        if conn.rx_cnt + n - conn.told_fwd > BUF_ALLOC:  # past what we told it was free
            self._protocol_error(conn, "the guest sent more than its credit")
            return
        conn.rx_cnt += n
        if conn.out:
            for v in payload:
                conn.out += v
        else:
            try:
                sent = conn.sock.sendmsg(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the host side is gone
                self._queue(OP_RST, conn.host_port, conn.guest_port)
                self._close(conn)
                return
            conn.fwd_cnt += sent
            self.stats.bytes_to_host += sent
            if sent < n:
                conn.out += b"".join(payload)[sent:]
        if conn.out:
            self._watch(conn)
        self._credit_update(conn)

    def _credit_update(self, conn: Conn) -> None:
        """Tell the guest of freed space once it believes less than half of the buffer is free."""
        believed_free = BUF_ALLOC - (conn.rx_cnt - conn.told_fwd)
        if conn.fwd_cnt != conn.told_fwd and believed_free < BUF_ALLOC // 2:
            self._queue(OP_CREDIT_UPDATE, conn.host_port, conn.guest_port, conn=conn)

    def _protocol_error(self, conn: Conn, why: str) -> None:
        self.stats.protocol_errors += 1
        self._log_once("proto", "%s: connection reset", why)
        self._queue(OP_RST, conn.host_port, conn.guest_port)
        self._close(conn)

    def _guest_shutdown(self, conn: Conn, flags: int) -> None:
        conn.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        self._flush(conn)  # the data the host has not taken yet still goes first; then it may end
        if conn.key in self.conns:
            self._maybe_read(conn)

    def _finished(self, conn: Conn) -> bool:
        """After everything the guest sent reached the host: end the connection if both sides are done
        (True), else pass the guest's half-close on to the host socket."""
        if not conn.guest_shut & SHUTDOWN_SEND:
            return False
        if conn.guest_shut & SHUTDOWN_RCV or conn.host_eof:
            self._queue(OP_RST, conn.host_port, conn.guest_port)
            self._close(conn)
            return True
        _shutdown(conn.sock, socket.SHUT_WR)
        return False

    # -- host sockets ----------------------------------------------------------------------------------
    def _watch(self, conn: Conn) -> None:
        read = (
            conn.established
            and not conn.readable
            and not conn.host_eof
            and not conn.guest_shut & SHUTDOWN_RCV
        )
        read = read and conn.peer_credit() > 0
        callback = self._cb(lambda: self._host_ready(conn))
        self.loop.watch(conn.sock.fileno(), callback, read=read, write=bool(conn.out))

    def _maybe_read(self, conn: Conn) -> None:
        if conn.key in self.conns:
            self._watch(conn)

    def _host_ready(self, conn: Conn) -> None:
        if self.conns.get(conn.key) is not conn:
            return
        if conn.out:
            self._flush(conn)
            if conn.key not in self.conns:
                return
        if conn.established and not conn.readable and not conn.host_eof and conn.peer_credit() > 0:
            readable = True  # data, EOF or an error: each shows when the data is read
            try:
                conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                readable = False
            except OSError:
                pass
            if readable:
                conn.readable = True
                self._ready.append(conn)
                self._wake_rx()
        self._watch(conn)

    def _flush(self, conn: Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._queue(OP_RST, conn.host_port, conn.guest_port)
                self._close(conn)
                return
            del conn.out[:sent]
            conn.fwd_cnt += sent
            self.stats.bytes_to_host += sent
        if not conn.out and self._finished(conn):
            return
        self._credit_update(conn)

    # -- packets to the guest --------------------------------------------------------------------------
    def _rw_header(self, conn: Conn, n: int) -> Packet:
        conn.told_fwd = conn.fwd_cnt
        return Packet(HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, n, TYPE_STREAM, OP_RW, 0,
                      BUF_ALLOC, conn.fwd_cnt)  # fmt: skip

    def recv_pkt(self, bufs: list[memoryview]) -> int | None:
        self._busy = True
        try:
            return self._to_guest(bufs)
        finally:
            self._busy = False

    def _to_guest(self, bufs: list[memoryview]) -> int | None:
        if self._control:
            pkt, data = self._control.popleft()
            return _write_packet(bufs, pkt, data)
        while self._ready:
            conn = self._ready[0]
            n = self._read_host(conn, bufs)
            if n is not None:
                self._ready.rotate(-1)  # the next connection's turn
                return n
            self._ready.popleft()
            conn.readable = False
            self._maybe_read(conn)
            if self._control:  # reading found the end of a connection: tell the guest
                pkt, data = self._control.popleft()
                return _write_packet(bufs, pkt, data)
        return None

    def _read_host(self, conn: Conn, bufs: list[memoryview]) -> int | None:
        """An RW packet of the host socket's data into *bufs*, or None (no data, no credit, closed)."""
        if self.conns.get(conn.key) is not conn:
            return None
        credit = conn.peer_credit()
        if credit <= 0:
            if not conn.credit_asked:
                conn.credit_asked = True
                self._queue(OP_CREDIT_REQUEST, conn.host_port, conn.guest_port, conn=conn)
            return None
        conn.credit_asked = False
        room = split_views(split_views(bufs, HDR_SIZE)[1], min(credit, MAX_PAYLOAD))[0]
        try:
            n = conn.sock.recvmsg_into(room)[0] if room else 0
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            n = 0
        if n == 0:  # the host will send no more
            conn.host_eof = True
            if conn.guest_shut & SHUTDOWN_SEND and not conn.out:
                self._queue(OP_RST, conn.host_port, conn.guest_port)
                self._close(conn)
            else:
                self._queue(OP_SHUTDOWN, conn.host_port, conn.guest_port, SHUTDOWN_SEND, conn=conn)
            return None
        conn.tx_cnt += n
        self.stats.bytes_to_guest += n
        return _write_header(bufs, self._rw_header(conn, n)) + n


def _nothing() -> None:
    pass


def _call(fn: Callable[[], None]) -> None:
    fn()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _connect_port(line: bytes) -> int | None:
    """The port of ``CONNECT <port>`` (decimal, 0..2**32-1), or None."""
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or len(parts[1]) > 10:
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


def _write_header(bufs: list[memoryview], pkt: Packet) -> int:
    if bufs[0].nbytes >= HDR_SIZE:
        HEADER.pack_into(bufs[0], 0, *pkt)
    else:
        scatter(bufs, HEADER.pack(*pkt))
    return HDR_SIZE


def _write_packet(bufs: list[memoryview], pkt: Packet, data: bytes) -> int:
    """A whole packet into *bufs*; the payload is cut to the room there is (callers keep it small)."""
    done = scatter(bufs, data, HDR_SIZE)
    return _write_header(bufs, pkt._replace(len=done)) + done


class VsockError(PyrovmError, ConnectionError):
    """A host-side vsock connection could not be made (the guest refused it or did not answer)."""


class VsockHost:
    """The host's view of a VM's vsock (``VM.vsock``): connect to guest ports, listen for the guest."""

    def __init__(self, path: Path, cid: int) -> None:
        self.path = path
        self.cid = cid

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """A stream socket connected to guest port *port* (after ``CONNECT``/``OK``); VsockError when the
        guest refuses or does not answer."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(1)
                if not chunk:
                    raise VsockError(f"guest port {port}: connection refused")
                line += chunk
                if len(line) > 32:
                    raise VsockError(f"guest port {port}: bad answer {line!r}")
            if not line.startswith(b"OK "):
                raise VsockError(f"guest port {port}: bad answer {line!r}")
        except TimeoutError:
            sock.close()
            raise VsockError(f"guest port {port}: no answer within {timeout} s") from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def listen(self, port: int, backlog: int = 16) -> socket.socket:
        """A listening Unix socket at ``PATH_port``: the guest's connections to host port *port* arrive
        there (the caller closes it; a socket file left behind is taken as stale by the next listen)."""
        path = f"{self.path}_{port}"
        if os.path.lexists(path):
            remove_stale_socket(Path(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(backlog)
        return sock


def remove_stale_socket(path: Path) -> None:
    """Remove *path* if it is a Unix socket nobody listens on (left by a VM that was killed)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _listen(path: Path) -> socket.socket:
    """The VM's vsock socket; ConfigError when *path* exists (as Firecracker, it is not replaced)."""
    if os.path.lexists(path):
        raise ConfigError(f"vsock socket {path} already exists (remove it, or give another uds=)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        if e.errno == errno.ENAMETOOLONG or "too long" in str(e):
            raise ConfigError(f"vsock socket {path}: path too long for a Unix socket") from None
        raise ConfigError(f"vsock socket {path}: {e.strerror or e}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock
