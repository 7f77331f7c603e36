"""A stream socket carrying Ethernet frames, each after a 4-byte big-endian length: passt's protocol on
its Unix socket (QEMU's ``-netdev stream``).  Frames carry no virtio-net header on the wire.

Receiving reads as much as the socket holds into one 256 KiB buffer (one system call for many small
frames) and copies each frame once into the guest's buffers; sending copies each frame, after its
length, into a queue that goes out in one system call per batch of the device (at most 256 KiB held:
past that a frame waits in the guest's ring until the socket drains).
"""

from __future__ import annotations

import socket

from pyrovm.devices.virtio.net import MAX_FRAME, NET_HDR_SIZE, BackendClosedError
from pyrovm.devices.virtio.queue import scatter, split_views

RECV_BUFFER = 256 * 1024
#: Bytes of queued frames after which a send waits for the socket (bounds what the backend holds).
SEND_BATCH = 256 * 1024
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
        self._out = bytearray()  # frames queued for the socket, each after its length
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
        """Queue one frame (length + frame, copied: the guest may reuse its buffers at once); the queue
        goes out in one system call at :meth:`end_batch`, or earlier once it holds :data:`SEND_BATCH`."""
        out = self._out
        if len(out) >= SEND_BATCH and not self.flush():
            return False  # the socket is full: the frame stays in the guest's ring
        frame = split_views(bufs, NET_HDR_SIZE)[1]
        length = 0
        for v in frame:
            length += v.nbytes
        out += length.to_bytes(4, "big")
        for v in frame:
            out += v
        return True

    def end_batch(self) -> None:
        """The device's batch is done: send what is queued (what the socket does not take stays queued; a
        peer that went away shows at the next flush, from the device's writability callback)."""
        if self._out:
            try:
                self.flush()
            except BackendClosedError:  # (the device does not expect it here: it would need a reset)
                pass

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        out = self._out
        while out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                raise BackendClosedError(f"{self.name}: {e.strerror}") from e
            del out[:sent]
        return True

    def set_offload(self, guest_features: int) -> None:
        """No offloads on a stream: frames are always complete and checksummed."""

    def close(self) -> None:
        self.sock.close()
