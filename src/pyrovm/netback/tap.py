"""A tap device as a NIC's backend: ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` with a 12-byte virtio-net
header, non-blocking.  One ``read`` is one frame, one ``write`` sends one frame (``readv``/``writev``
straight from and to guest buffers); the kernel does checksum and segmentation offloads from the header
(``TUNSETOFFLOAD`` enables those the guest said it can receive).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from pyrovm.devices.virtio.net import (
    NET_HDR_SIZE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    BackendClosedError,
    FrameRejectedError,
)
from pyrovm.errors import ConfigError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
IFNAMSIZ = 16

#: guest feature -> tap offload flag (only with GUEST_CSUM: the kernel refuses TSO without CSUM)
_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)


def check_ifname(name: str) -> None:
    """ConfigError unless *name* can be a network interface's name."""
    if (
        not name
        or not name.isprintable()  # (before encoding: an unpaired surrogate cannot be encoded; a NUL byte)
        or len(name.encode()) >= IFNAMSIZ
        or "/" in name
        or name in (".", "..")
        or any(c.isspace() or c == ":" for c in name)
    ):
        raise ConfigError(f"tap name {name!r}: 1 to {IFNAMSIZ - 1} characters, no '/', ':' or spaces")


def offload_flags(guest_features: int) -> int:
    """The ``TUNSETOFFLOAD`` flags for the virtio-net features a guest accepted."""
    if not guest_features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    for bit, flag in _OFFLOADS:
        if guest_features >> bit & 1:
            flags |= flag
    return flags


class TapBackend:
    """An open tap device (see :func:`open_tap`)."""

    vnet_hdr = True

    def __init__(self, fd: int, name: str, created: bool) -> None:
        self.fd = fd
        self.name = name
        #: True when opening it created the interface (it goes away when the VM closes it).
        self.created = created
        self.offloads = 0

    def fileno(self) -> int:
        return self.fd

    def recv_frame(self, bufs: list[memoryview]) -> int | None:
        try:
            return os.readv(self.fd, bufs)
        except BlockingIOError:
            return None
        except OSError as e:  # EBADFD when the interface was deleted
            raise BackendClosedError(f"tap {self.name}: {e.strerror}") from e

    def send_frame(self, bufs: list[memoryview]) -> bool:
        try:
            os.writev(self.fd, bufs)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                raise BackendClosedError(f"tap {self.name}: {e.strerror}") from e
            # EINVAL: e.g. a header with impossible GSO fields; anything else drops this frame only too
            raise FrameRejectedError(f"tap {self.name}: {e.strerror}") from e
        return True

    @property
    def wants_write(self) -> bool:
        return False

    def flush(self) -> bool:
        return True

    def end_batch(self) -> None:
        """Nothing queued: every frame was written at once."""

    def set_offload(self, guest_features: int) -> None:
        flags = offload_flags(guest_features)
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        self.offloads = flags

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tap(name: str) -> TapBackend:
    """Attach to tap *name* (creating it when it does not exist and this process may), with the virtio-net
    header on and no offloads until the guest negotiates them.  ConfigError with the reason otherwise."""
    check_ifname(name)
    existed = _exists(name)
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"tap {name}: {TUN_DEVICE} is missing (load the tun module: modprobe tun)"
        ) from None
    except OSError as e:
        raise ConfigError(f"tap {name}: cannot open {TUN_DEVICE}: {e.strerror}") from None
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise ConfigError(_tunsetiff_error(name, existed, e)) from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except BaseException:
        os.close(fd)
        raise
    return TapBackend(fd, name, created=not existed)


def _exists(name: str) -> bool:
    """Whether this network namespace has an interface *name* (asked of the kernel, not of /sys, which
    shows the namespace it was mounted in)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _tunsetiff_error(name: str, existed: bool, e: OSError) -> str:
    if e.errno == errno.EPERM:
        if not existed:
            return (
                f"tap {name} does not exist and this user may not create it "
                f"(create it first: ip tuntap add {name} mode tap user $USER)"
            )
        return f"tap {name}: permission denied (it belongs to another user: ip tuntap add ... user $USER)"
    if e.errno == errno.EBUSY:
        return f"tap {name} is in use by another process"
    if e.errno == errno.EINVAL:
        return f"{name} is not a tap device (a tun device or another kind of interface?)"
    return f"tap {name}: {e.strerror}"
