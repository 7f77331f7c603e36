"""Host ends of a guest NIC: a tap device (:mod:`.tap`) or passt's user-mode network (:mod:`.passt`,
over the length-prefixed stream of :mod:`.stream`).  Each is a
:class:`pyrovm.devices.virtio.net.FrameBackend`.
"""

from .passt import PasstNetwork, start_passt
from .stream import StreamBackend
from .tap import TapBackend, open_tap

__all__ = ["PasstNetwork", "StreamBackend", "TapBackend", "open_tap", "start_passt"]
