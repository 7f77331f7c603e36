"""virtio-blk on a raw image file (VIRTIO 1.2 §5.2).

Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES.  Data moves with ``os.preadv`` / ``os.pwritev``
straight between the file and views of guest memory.  Writes are in the file (page cache) before they
are completed; FLUSH ``fsync``s before it completes.  DISCARD and WRITE_ZEROES punch holes with
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``.  The image is ``flock``ed (exclusive when
writable, shared when read-only) so that two VMs cannot write it at once.

When one notification brings several requests, runs of plain reads (or plain writes) whose sectors follow
each other are served by one ``preadv`` / ``pwritev`` over their concatenated buffers (at most IOV_MAX
buffers and :data:`MERGE_MAX_BYTES` a call), then completed one by one, in order.  Any other request
(FLUSH, GET_ID, DISCARD, WRITE_ZEROES, anything malformed or out of range, a write to a read-only disk)
ends the run before it is served, so it sees exactly the requests that came before it.  A merged call
that fails or comes up short is done again request by request, each getting its own status.

State (:class:`VirtioBlockState`): the negotiated features, and the disk's capacity and mode, which a
restore checks against the image it was given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from pyrovm.devices.ratelimit import RateLimitSpec, Scheduler, Throttle
from pyrovm.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice, VirtioDeviceState
from pyrovm.devices.virtio.queue import ChainError, DescriptorChain, SplitQueue, split_views, trim_views
from pyrovm.errors import DeviceError

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

MAX_DISCARD_SECTORS = 0x3FFFFF
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
MAX_WRITE_ZEROES_SEG = 32

_KNOWN_TYPES = frozenset(
    {
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    }
)

REQ_HEADER = struct.Struct("<IIQ")
DISCARD_SEGMENT = struct.Struct("<QII")
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: Most bytes one merged ``preadv`` / ``pwritev`` moves (a single larger request still goes alone).
MERGE_MAX_BYTES = 1 << 20
_ZEROES = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises OSError."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


class BlockError(DeviceError):
    """The disk image cannot be used (missing, size not a multiple of 512, locked...)."""


class DiskLockedError(BlockError):
    """Another process (another VM) holds a conflicting lock on the image."""


@dataclass
class VirtioBlockState(VirtioDeviceState):
    """The disk as the driver knows it: capacity (sectors) and read-only mode."""

    capacity: int = 0
    read_only: bool = False


class _Status(Exception):
    """Internal: finish the request with this status."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(why)
        self.status = status


# -- requests, parsed once ------------------------------------------------------------------------------
class BlockRequest(tuple):  # type: ignore[type-arg]
    """One virtio-blk request, parsed once from its chain (both the merge path and the single path use it):
    ``(chain, rtype, sector, data, nbytes, status, error, why, plain)``.

    ``data``: the data buffers (after the header for OUT; before the status byte for IN, GET_ID and the
    other types), ``nbytes`` bytes in all; ``status``: a 1-byte view of the status byte (None when the
    chain has no writable byte for it); ``error``: the status to complete with when the request is
    malformed (``why`` says how), None when it is well formed; ``plain``: a valid read or write of whole
    sectors inside the disk (one that can be merged with its neighbours).  A tuple, because the hot path
    makes one per request and indexes it: cheaper than an object with attributes (the slow paths read
    those names).
    """

    __slots__ = ()

    chain: DescriptorChain = property(itemgetter(0))  # type: ignore[assignment]
    rtype: int = property(itemgetter(1))  # type: ignore[assignment]
    sector: int = property(itemgetter(2))  # type: ignore[assignment]
    data: list[memoryview] = property(itemgetter(3))  # type: ignore[assignment]
    nbytes: int = property(itemgetter(4))  # type: ignore[assignment]
    status: memoryview | None = property(itemgetter(5))  # type: ignore[assignment]
    error: int | None = property(itemgetter(6))  # type: ignore[assignment]
    why: str = property(itemgetter(7))  # type: ignore[assignment]
    plain: bool = property(itemgetter(8))  # type: ignore[assignment]


_tuple_new = tuple.__new__


def _request(
    chain: DescriptorChain,
    rtype: int,
    sector: int,
    data: list[memoryview],
    nbytes: int,
    status: memoryview | None,
    error: int | None = None,
    why: str = "",
) -> BlockRequest:
    return _tuple_new(BlockRequest, (chain, rtype, sector, data, nbytes, status, error, why, False))  # type: ignore[no-any-return]


_HEADER_SIZE = REQ_HEADER.size
_unpack_header = REQ_HEADER.unpack_from


def parse_request(chain: DescriptorChain, disk_size: int = 0, read_only: bool = True) -> BlockRequest:
    """Header, data buffers and status byte of *chain*, and whether it is a plain read or write inside a
    disk of *disk_size* bytes (*read_only*: writes are not).  The usual layouts (header alone, then one
    data buffer, then the status byte alone) skip the generic scatter-list cuts."""
    writable = chain.writable
    readable = chain.readable
    view = chain.view
    # the layouts drivers use: [header] [data, status] for reads, [header, data] [status] for writes
    if (
        readable
        and writable
        and len(readable) + len(writable) == 3
        and readable[0][1] == _HEADER_SIZE
        and writable[-1][1] == 1
    ):
        rtype, _, sector = _unpack_header(view(readable[0][0], _HEADER_SIZE))
        if rtype == VIRTIO_BLK_T_IN and len(writable) == 2:
            gpa, n = writable[0]
            plain = n and not n % SECTOR_SIZE and (sector << SECTOR_SHIFT) + n <= disk_size
            fields = (chain, rtype, sector, [view(gpa, n)], n, view(writable[1][0], 1), None, "", plain)
            return _tuple_new(BlockRequest, fields)  # type: ignore[no-any-return]
        if rtype == VIRTIO_BLK_T_OUT and len(readable) == 2:
            gpa, n = readable[1]
            plain = not read_only and n and not n % SECTOR_SIZE and (sector << SECTOR_SHIFT) + n <= disk_size
            fields = (chain, rtype, sector, [view(gpa, n)], n, view(writable[0][0], 1), None, "", plain)
            return _tuple_new(BlockRequest, fields)  # type: ignore[no-any-return]
    req = _parse_any(chain, readable, writable, view)
    _, rtype, sector, data, nbytes, _, error, _, _ = req
    if error is None and (rtype == VIRTIO_BLK_T_IN or (rtype == VIRTIO_BLK_T_OUT and not read_only)):
        if nbytes and not nbytes % SECTOR_SIZE and (sector << SECTOR_SHIFT) + nbytes <= disk_size:
            if len(data) <= _IOV_MAX:
                return _tuple_new(BlockRequest, (*req[:8], True))  # type: ignore[no-any-return]
    return req


def _parse_any(
    chain: DescriptorChain,
    readable: list[tuple[int, int]],
    writable: list[tuple[int, int]],
    view: Callable[[int, int], memoryview],
) -> BlockRequest:
    """:func:`parse_request` for any layout (``plain`` left False)."""
    if not writable or not writable[-1][1]:
        return _request(chain, -1, 0, [], 0, None, VIRTIO_BLK_S_IOERR, "no writable status byte")
    status_gpa, status_len = writable[-1]
    status = view(status_gpa + status_len - 1, 1)
    nw = len(writable)
    data_in: list[memoryview]
    if status_len != 1:
        data_in = trim_views(chain.writable_views(), 1)[0]
        in_bytes = sum(v.nbytes for v in data_in)
    elif nw == 1:
        data_in = []
        in_bytes = 0
    elif nw == 2:
        gpa, in_bytes = writable[0]
        data_in = [view(gpa, in_bytes)]
    else:
        data_in = [view(gpa, n) for gpa, n in writable[:-1]]
        in_bytes = sum(v.nbytes for v in data_in)
    if readable and readable[0][1] >= REQ_HEADER.size:
        rtype, _, sector = REQ_HEADER.unpack_from(view(readable[0][0], REQ_HEADER.size))
    else:
        header = chain.read_prefix(REQ_HEADER.size)
        if len(header) < REQ_HEADER.size:
            why = "request header is not in device-readable buffers"
            return _request(chain, -1, 0, data_in, in_bytes, status, VIRTIO_BLK_S_IOERR, why)
        rtype, _, sector = REQ_HEADER.unpack_from(header)
    if rtype == VIRTIO_BLK_T_IN:
        if (
            len(readable) != 1 or readable[0][1] != REQ_HEADER.size
        ) and chain.readable_len != REQ_HEADER.size:
            why = "read request with device-readable data buffers"
            return _request(chain, rtype, sector, data_in, in_bytes, status, VIRTIO_BLK_S_IOERR, why)
    elif rtype == VIRTIO_BLK_T_OUT:
        if data_in:
            why = "write request with device-writable data buffers"
            return _request(chain, rtype, sector, [], 0, status, VIRTIO_BLK_S_IOERR, why)
        if len(readable) == 2 and readable[0][1] == REQ_HEADER.size:
            gpa, out_bytes = readable[1]
            return _request(chain, rtype, sector, [view(gpa, out_bytes)], out_bytes, status)
        data_out = split_views(chain.readable_views(), REQ_HEADER.size)[1]
        return _request(chain, rtype, sector, data_out, sum(v.nbytes for v in data_out), status)
    return _request(chain, rtype, sector, data_in, in_bytes, status)


# -- file I/O -------------------------------------------------------------------------------------------
def _rw_full(
    op: Callable[[int, list[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    nbytes: int,
    why: str,
) -> int:
    """Transfer *nbytes* (the total size of *views*) at *offset*: one call unless it comes up short."""
    if not nbytes:
        return 0
    if len(views) <= _IOV_MAX:
        n = op(fd, views, offset)
        if n == nbytes:
            return n
        if n <= 0:
            raise OSError(errno.EIO, why)
        return n + _rw_rest(op, fd, split_views(views, n)[1], offset + n, why)
    return _rw_rest(op, fd, views, offset, why)


def _preadv_full(fd: int, views: list[memoryview], offset: int, nbytes: int) -> int:
    """Read *nbytes* into *views* from *offset* (``os.preadv``, resumed after short reads)."""
    return _rw_full(os.preadv, fd, views, offset, nbytes, "unexpected end of disk image")


def _pwritev_full(fd: int, views: list[memoryview], offset: int, nbytes: int) -> int:
    """Write *views* (*nbytes* in all) at *offset* (``os.pwritev``, resumed after short writes)."""
    return _rw_full(os.pwritev, fd, views, offset, nbytes, "short write to disk image")


def _rw_rest(
    op: Callable[[int, list[memoryview], int], int], fd: int, views: list[memoryview], offset: int, why: str
) -> int:
    """Transfer *views* at *offset* in batches of at most IOV_MAX, resuming after short transfers."""
    total = 0
    while views:
        batch = views[:_IOV_MAX]
        want = sum(v.nbytes for v in batch)
        n = op(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, why)
        total += n
        offset += n
        views = views[len(batch) :] if n == want else split_views(views, n)[1]
    return total


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV)


def zero_range(fd: int, offset: int, nbytes: int) -> None:
    """Make ``[offset, offset + nbytes)`` of *fd* read as zeroes (``FALLOC_FL_ZERO_RANGE``, else writes)."""
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        return
    except OSError as e:
        if not _unsupported(e):
            raise
    zero = memoryview(_ZEROES)
    while nbytes:
        n = os.pwrite(fd, zero[: min(nbytes, len(_ZEROES))], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write to disk image")
        offset += n
        nbytes -= n


def punch_hole(fd: int, offset: int, nbytes: int, must_zero: bool) -> OSError | None:
    """Deallocate a range of *fd*; where holes are not supported, zero it if *must_zero*.  Returns the
    "not supported" error (for the caller to log), None when the hole was punched."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        return None
    except OSError as e:
        if not _unsupported(e):
            raise
        if must_zero:
            zero_range(fd, offset, nbytes)
        return e


def parse_segments(chain: DescriptorChain, zeroes: bool) -> list[tuple[int, int, int]]:
    """The ``(sector, num_sectors, flags)`` segments of a DISCARD / WRITE_ZEROES request (not checked
    against the disk size).  Raises :class:`_Status`."""
    length = chain.readable_len - REQ_HEADER.size
    max_seg = MAX_WRITE_ZEROES_SEG if zeroes else MAX_DISCARD_SEG
    if length <= 0 or length % DISCARD_SEGMENT.size or length // DISCARD_SEGMENT.size > max_seg:
        raise _Status(VIRTIO_BLK_S_IOERR, f"bad discard/write-zeroes segment list of {length} bytes")
    raw = chain.read_prefix(REQ_HEADER.size + length)
    segments = [
        DISCARD_SEGMENT.unpack_from(raw, off)
        for off in range(REQ_HEADER.size, REQ_HEADER.size + length, DISCARD_SEGMENT.size)
    ]
    max_sectors = MAX_WRITE_ZEROES_SECTORS if zeroes else MAX_DISCARD_SECTORS
    for _, num, flags in segments:
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (not zeroes and flags):
            raise _Status(VIRTIO_BLK_S_UNSUPP, f"unsupported discard/write-zeroes flags {flags:#x}")
        if num > max_sectors:
            raise _Status(VIRTIO_BLK_S_IOERR, f"{num} sectors is over the limit of {max_sectors}")
    return segments


def open_image(path: Path, read_only: bool) -> tuple[int, int]:
    """Open and lock a raw image: ``(fd, size)``; BlockError / DiskLockedError naming the file."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise BlockError(f"{path}: cannot open disk image: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise DiskLockedError(
                f"{path}: disk image is locked by another process (already in use by another VM?)"
            ) from e
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0 or size % SECTOR_SIZE:
            raise BlockError(f"{path}: disk image size {size} is not a positive multiple of 512 bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _config_space(capacity: int, queue_size: int) -> bytes:
    """The virtio-blk configuration space of a disk of *capacity* sectors."""
    return CONFIG.pack(
        capacity,
        0,  # size_max (feature not offered)
        max(queue_size - 2, 1),  # seg_max
        0,
        0,
        0,  # geometry
        SECTOR_SIZE,  # blk_size
        0,
        0,
        0,
        0,  # topology
        0,  # writeback
        0,  # unused0
        1,  # num_queues
        MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEG,
        DISCARD_SECTOR_ALIGNMENT,
        MAX_WRITE_ZEROES_SECTORS,
        MAX_WRITE_ZEROES_SEG,
        1,  # write_zeroes_may_unmap
    )


class VirtioBlock(VirtioDevice):
    """A virtio block device backed by a raw image file."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        serial: str | bytes | None = None,
        queue_size: int = 256,
        name: str | None = None,
        rate_limiter: RateLimitSpec | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        """Open and lock *path*; raises :class:`BlockError` / :class:`DiskLockedError` naming the file.
        *rate_limiter* (bytes of reads and writes, requests) needs *scheduler* for its timers."""
        self.path = Path(path)
        super().__init__(name or f"virtio-blk({self.path.name})", [queue_size])
        self.throttle = Throttle(rate_limiter, scheduler)
        if isinstance(serial, str):
            try:
                serial = serial.encode("ascii")
            except UnicodeEncodeError as e:
                raise BlockError(f"{self.path}: serial {serial!r} is not ASCII") from e
        serial = serial or b""
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise BlockError(f"{self.path}: serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.serial = serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.read_only = read_only
        self.fd, self.size = open_image(self.path, read_only)
        self.capacity = self.size >> SECTOR_SHIFT
        self._config = _config_space(self.capacity, queue_size)

    # -- description -----------------------------------------------------------------------------------
    def device_features(self) -> int:
        bits = [VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        else:
            bits += [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
        return sum(1 << b for b in bits)

    def config_bytes(self) -> bytes:
        return self._config

    def swap(self, path: str | os.PathLike[str]) -> None:
        """Serve another image from now on (Firecracker's PATCH of ``path_on_host``): the new one is opened
        and locked first (BlockError, with the old one kept, when it cannot be); then the capacity in the
        config space follows it.  Call under the transport's lock, then ``config_changed()`` on it."""
        fd, size = open_image(Path(path), self.read_only)
        old, self.fd = self.fd, fd
        self.path, self.size, self.capacity = Path(path), size, size >> SECTOR_SHIFT
        self._config = _config_space(self.capacity, self.queue_max_sizes[0])
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        """Unlock and close the image."""
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1

    def __enter__(self) -> VirtioBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save_state(self) -> VirtioBlockState:
        return VirtioBlockState(self.acked_features, self.capacity, self.read_only)

    def restore_state(self, state: VirtioDeviceState) -> None:
        """Load *state*; raises :class:`BlockError` when this image's size or mode differ from the saved."""
        if isinstance(state, VirtioBlockState) and (state.capacity, state.read_only) != (
            self.capacity,
            self.read_only,
        ):
            raise BlockError(
                f"{self.path}: saved state is for a disk of {state.capacity} sectors"
                f"{' (read-only)' if state.read_only else ''}, this one has {self.capacity}"
            )
        super().restore_state(state)

    # -- requests --------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        """Serve every available chain of queue *queue_index*, merging runs of adjacent reads or writes.

        Raises only :class:`QueueBrokenError`, after serving the requests it held for merging.
        """
        queue = self.live_queue(queue_index)
        if queue is None:
            return
        if self.throttle.limiter is not None:
            if self.throttle.resume is None and self._kick is not None:
                kick = self._kick
                self.throttle.resume = lambda: kick(queue_index)
            queue.drain(self._serve_limited)
        else:
            queue.drain(self._serve_batch)

    def _serve_limited(self, queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
        """Serve *batch* one request at a time as the rate limiter allows; the rest waits for its timer."""
        size, read_only, allow = self.size, self.read_only, self.throttle.allow
        for i, chain in enumerate(batch):
            if type(chain) is not DescriptorChain:
                self.chain_failed(queue, chain)  # type: ignore[arg-type]
                continue
            req = parse_request(chain, size, read_only)
            if not allow(req[4] if req[8] else 0):
                queue.undo_pop(len(batch) - i)
                return False
            queue.add_used(chain.head, self.serve(req))
        return True

    def metrics(self) -> dict[str, int]:
        return {**super().metrics(), **self.throttle.metrics()}

    def _serve_batch(self, queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
        """Serve *batch*, merging runs of adjacent plain reads (or writes) into one syscall; everything is
        completed, in order, when it returns (also when it raises)."""
        size, read_only = self.size, self.read_only
        if len(batch) == 1 and type(batch[0]) is DescriptorChain:  # the usual case at queue depth 1
            req = parse_request(batch[0], size, read_only)
            if req[8]:
                start = req[2] << SECTOR_SHIFT
                self._serve_run(queue, [req], req[1] == VIRTIO_BLK_T_OUT, start, start + req[4])
            else:
                queue.add_used(req[0].head, self.serve(req))
            return True
        serve_run = self._serve_run
        # the held run: its requests, how many buffers they have, direction and byte range
        run: list[BlockRequest] = []
        nviews = start = end = 0
        is_write = False
        try:
            for chain in batch:
                if type(chain) is not DescriptorChain:  # a malformed chain: what is held goes first
                    if run:
                        run = serve_run(queue, run, is_write, start, end)
                    self.chain_failed(queue, chain)  # type: ignore[arg-type]
                    continue
                req = parse_request(chain, size, read_only)
                if req[8]:  # a plain valid read or write: held, to be merged with the next ones
                    offset, nbytes, n = req[2] << SECTOR_SHIFT, req[4], len(req[3])
                    write = req[1] == VIRTIO_BLK_T_OUT
                    if (
                        run
                        and offset == end
                        and write == is_write
                        and nviews + n <= _IOV_MAX
                        and end - start + nbytes <= MERGE_MAX_BYTES
                    ):  # it continues the run
                        run.append(req)
                        nviews += n
                        end += nbytes
                    else:
                        if run:
                            serve_run(queue, run, is_write, start, end)
                        run, nviews, is_write, start, end = [req], n, write, offset, offset + nbytes
                    continue
                if run:  # anything else is a barrier: what is held goes first
                    run = serve_run(queue, run, is_write, start, end)
                queue.add_used(chain.head, self.serve(req))
        finally:  # also when something breaks: what was held is served before the error goes up
            if run:
                serve_run(queue, run, is_write, start, end)
        return True

    def _serve_run(
        self, queue: SplitQueue, run: list[BlockRequest], is_write: bool, start: int, end: int
    ) -> list[BlockRequest]:
        """Serve a held run (adjacent reads, or writes, covering ``[start, end)`` of the image) with one
        syscall and complete each request in order; on an error or a short transfer serve each again on
        its own.  Returns a new empty run."""
        views = run[0][3] if len(run) == 1 else [v for req in run for v in req[3]]
        try:
            n = os.pwritev(self.fd, views, start) if is_write else os.preadv(self.fd, views, start)
        except OSError:
            n = -1
        add_used = queue.add_used
        if n != end - start:
            for req in run:
                add_used(req[0].head, self.serve(req))
            return []
        stats = self.stats
        stats.requests += len(run)
        if is_write:
            stats.bytes_written += n
            for req in run:
                req[5][0] = VIRTIO_BLK_S_OK
                add_used(req[0].head, 1)
        else:
            stats.bytes_read += n
            for req in run:
                req[5][0] = VIRTIO_BLK_S_OK
                add_used(req[0].head, req[4] + 1)
        return []

    def handle_chain(self, queue_index: int, queue: SplitQueue, chain: DescriptorChain) -> int:
        return self.serve(parse_request(chain, self.size, self.read_only))

    def serve(self, req: BlockRequest) -> int:
        """Serve one request on its own and write its status; returns the bytes written into the chain."""
        stats = self.stats
        stats.requests += 1
        if req.status is None:
            stats.errors += 1
            self.log_once("no-status", "%s: request without a writable status byte", self.name)
            return 0
        written = 0
        rtype = req.rtype
        try:
            if req.error is not None:
                raise _Status(req.error, req.why)
            if rtype == VIRTIO_BLK_T_IN:
                written = self._read(req.sector, req.data, req.nbytes)
            elif rtype == VIRTIO_BLK_T_OUT:
                self._write(req.sector, req.data, req.nbytes)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                if not self.read_only:
                    os.fsync(self.fd)
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written = req.chain.write_to_writable(self.serial[: req.nbytes])
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                self._discard_or_zero(rtype, req.chain)
            else:
                raise _Status(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")
            code = VIRTIO_BLK_S_OK
        except _Status as s:
            code = s.status
            stats.errors += 1
            key = f"status:{code}:{rtype if rtype in _KNOWN_TYPES else -1}"
            self.log_once(key, "%s: request failed (status %d): %s", self.name, code, s)
        except OSError as e:
            code = VIRTIO_BLK_S_IOERR
            stats.errors += 1
            self.log_once(f"oserror:{e.errno}", "%s: I/O error: %s", self.name, e)
        req.status[0] = code
        return written + 1

    def _check_range(self, sector: int, nbytes: int) -> int:
        offset = sector << SECTOR_SHIFT
        if nbytes % SECTOR_SIZE:
            raise _Status(VIRTIO_BLK_S_IOERR, f"data length {nbytes} is not a multiple of 512")
        if offset + nbytes > self.size:
            raise _Status(
                VIRTIO_BLK_S_IOERR, f"sectors {sector}+{nbytes >> SECTOR_SHIFT} beyond the disk end"
            )
        return offset

    def _read(self, sector: int, views: list[memoryview], nbytes: int) -> int:
        offset = self._check_range(sector, nbytes)
        n = _preadv_full(self.fd, views, offset, nbytes)
        self.stats.bytes_read += n
        return n

    def _write(self, sector: int, views: list[memoryview], nbytes: int) -> None:
        if self.read_only:
            raise _Status(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        offset = self._check_range(sector, nbytes)
        self.stats.bytes_written += _pwritev_full(self.fd, views, offset, nbytes)

    def _discard_or_zero(self, rtype: int, chain: DescriptorChain) -> None:
        zeroes = rtype == VIRTIO_BLK_T_WRITE_ZEROES
        feature = VIRTIO_BLK_F_WRITE_ZEROES if zeroes else VIRTIO_BLK_F_DISCARD
        if self.read_only or not self.has_feature(feature):
            raise _Status(VIRTIO_BLK_S_UNSUPP, f"{'write-zeroes' if zeroes else 'discard'} not negotiated")
        segments = parse_segments(chain, zeroes)
        for sector, num, _ in segments:  # validate everything before touching the file
            self._check_range(sector, num << SECTOR_SHIFT)
        for sector, num, flags in segments:
            offset, nbytes = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            if nbytes == 0:
                continue
            if zeroes and not flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                zero_range(self.fd, offset, nbytes)
                continue
            unsupported = punch_hole(self.fd, offset, nbytes, must_zero=zeroes)
            if unsupported is not None:
                self.log_once("no-punch", "%s: hole punching not supported here: %s", self.name, unsupported)
