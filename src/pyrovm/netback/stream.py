"""A stream socket carrying Ethernet frames, each after a 4-byte big-endian length: passt's protocol on
its Unix socket (QEMU's ``-netdev stream``).  Frames carry no virtio-net header on the wire.

Receiving reads as much as the socket holds into one 256 KiB buffer (one system call for many small
frames) and copies each frame once into the guest's buffers; sending is one ``sendmsg`` per frame from
the guest's buffers, with the length in front.  A frame the socket took only in part is kept (one frame
at most) and finished when the socket is writable again.
"""

from __future__ import annotations

import errno
import socket

from pyrovm.devices.virtio.net import MAX_FRAME, NET_HDR_SIZE, BackendClosedError, scatter, split_views

RECV_BUFFER = 256 * 1024
_ZERO_HDR = bytes(NET_HDR_SIZE)


class StreamProtocolError(BackendClosedError):
    """The peer sent a frame length no Ethernet frame can have."""


class StreamBackend:
    """Frames over a connected stream socket (see module doc)."""

    vnet_hdr = False

    def __init__(self, sock: socket.socket, name: str = "stream") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._buf = bytearray(RECV_BUFFER)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self._pending: memoryview | None = None
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receive --------------------------------------------------------------------------------------
    def _fill(self) -> bool:
        """Read what the socket has after the bytes held; False when it had nothing."""
        if self._start and self._start == self._end:
            self._start = self._end = 0
        elif self._start > RECV_BUFFER // 2 or self._end == RECV_BUFFER:  # move the partial frame down
            n = self._end - self._start
            self._mv[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        if self._eof:
            return False
        try:
            got = self.sock.recv_into(self._mv[self._end :])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise BackendClosedError(f"{self.name}: {e.strerror}") from e
        if got == 0:
            self._eof = True
            return False
        self._end += got
        return True

    def recv_frame(self, bufs: list[memoryview]) -> int | None:
        while True:
            avail = self._end - self._start
            if avail >= 4:
                length = int.from_bytes(self._mv[self._start : self._start + 4], "big")
                if not 0 < length <= MAX_FRAME:
                    raise StreamProtocolError(f"{self.name}: frame length {length} (at most {MAX_FRAME})")
                if avail >= 4 + length:
                    start = self._start + 4
                    first = bufs[0]
                    if first.nbytes >= NET_HDR_SIZE + length:  # the usual case: one buffer holds it
                        first[:NET_HDR_SIZE] = _ZERO_HDR
                        first[NET_HDR_SIZE : NET_HDR_SIZE + length] = self._mv[start : start + length]
                    else:
                        scatter(bufs, _ZERO_HDR)
                        scatter(bufs, self._mv[start : start + length], NET_HDR_SIZE)
                    self._start = start + length
                    return NET_HDR_SIZE + length
            if not self._fill():
                if self._eof:
                    raise BackendClosedError(f"{self.name}: the peer closed the connection")
                return None

    # -- send -----------------------------------------------------------------------------------------
    def send_frame(self, bufs: list[memoryview]) -> bool:
        if self._pending is not None and not self.flush():
            return False
        frame = split_views(bufs, NET_HDR_SIZE)[1]
        length = sum(v.nbytes for v in frame)
        parts: list[bytes | memoryview] = [length.to_bytes(4, "big"), *frame]
        try:
            sent = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise BackendClosedError(f"{self.name}: {e.strerror}") from e
        if sent < 4 + length:  # keep the rest (a copy: the guest may reuse its buffers at once)
            self._pending = memoryview(b"".join(parts))[sent:]
        return True

    @property
    def wants_write(self) -> bool:
        return self._pending is not None

    def flush(self) -> bool:
        pending = self._pending
        while pending is not None:
            try:
                sent = self.sock.send(pending)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return False
                raise BackendClosedError(f"{self.name}: {e.strerror}") from e
            pending = pending[sent:] if sent < pending.nbytes else None
            self._pending = pending
        return True

    def set_offload(self, guest_features: int) -> None:
        """No offloads on a stream: frames are always complete and checksummed."""

    def close(self) -> None:
        self.sock.close()
