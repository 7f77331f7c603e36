"""virtio devices over the MMIO transport: split virtqueues, virtio-blk, virtio-rng, virtio-net, vsock.

The names below are imported on first use (``from pyrovm.devices.virtio import VirtioBlock`` works), so
that a VM without a disk does not pay for the block device's import at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyrovm.lazy import lazy_getattr

if TYPE_CHECKING:
    from pyrovm.devices.virtio.block import BlockError, DiskLockedError, VirtioBlock
    from pyrovm.devices.virtio.device import VirtioDevice, VirtioMetrics
    from pyrovm.devices.virtio.mmio import MMIO_SLOT_SIZE, QUEUE_NOTIFY, VirtioMmioTransport, cmdline_fragment
    from pyrovm.devices.virtio.queue import (
        ChainError,
        DescriptorChain,
        QueueBrokenError,
        QueueState,
        SplitQueue,
        VirtqueueError,
    )
    from pyrovm.devices.virtio.rng import VirtioRng

_WHERE = {
    "BlockError": "block",
    "DiskLockedError": "block",
    "VirtioBlock": "block",
    "VirtioDevice": "device",
    "VirtioMetrics": "device",
    "MMIO_SLOT_SIZE": "mmio",
    "QUEUE_NOTIFY": "mmio",
    "VirtioMmioTransport": "mmio",
    "cmdline_fragment": "mmio",
    "ChainError": "queue",
    "DescriptorChain": "queue",
    "QueueBrokenError": "queue",
    "QueueState": "queue",
    "SplitQueue": "queue",
    "VirtqueueError": "queue",
    "VirtioRng": "rng",
}


__getattr__ = lazy_getattr(__name__, _WHERE)

__all__ = [
    "MMIO_SLOT_SIZE",
    "QUEUE_NOTIFY",
    "BlockError",
    "ChainError",
    "DescriptorChain",
    "DiskLockedError",
    "QueueBrokenError",
    "QueueState",
    "SplitQueue",
    "VirtioBlock",
    "VirtioDevice",
    "VirtioMetrics",
    "VirtioMmioTransport",
    "VirtioRng",
    "VirtqueueError",
    "cmdline_fragment",
]
