"""Emulated devices.  They know nothing of KVM: they get interrupt callbacks and output streams."""

from collections.abc import Callable

#: Drives an interrupt line to a level (True = asserted); legacy devices model their IRQ pin with it.
IrqLevel = Callable[[bool], None]
#: Signals one edge-triggered interrupt (virtio over irqfd).
IrqTrigger = Callable[[], None]

__all__ = ["IrqLevel", "IrqTrigger"]
