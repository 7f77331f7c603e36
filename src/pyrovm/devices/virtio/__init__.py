"""virtio devices over the MMIO transport: split virtqueues, virtio-blk, virtio-rng."""

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
