"""The friendly facade: :class:`VM` takes keyword arguments, builds a machine and forwards to it.

::

    with pyrovm.VM(kernel="guest.elf", memory="128M", cpus=2, cmdline="test=hello") as vm:
        result = vm.wait(timeout=10)
    print(result.reason, result.exit_code, vm.console.text)

Underneath: :class:`~pyrovm.config.VmConfig` (what the VM is), :func:`~pyrovm.builder.build` (config →
machine), :class:`~pyrovm.machine.Machine` (the running VM).  ``VM.from_config(config)`` starts from a
config directly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .builder import RestoreOptions, build, restore
from .config import DEFAULT_CMDLINE, DiskSpec, NetSpec, VmConfig, VsockSpec, parse_size
from .console import ConsoleLog
from .devices.bus import Bus
from .errors import ConfigError
from .kvm.system import DEFAULT_KVM_DEVICE
from .machine import Machine
from .memory import GuestMemory
from .result import ExitCode, ExitReason, VmExit
from .vcpu import KICK_SIGNAL, install_kick_handler

if TYPE_CHECKING:  # (imported where used)
    from .netback.vsock import VsockHost
    from .snapshot import SnapshotInfo, SnapshotState

__all__ = [
    "KICK_SIGNAL",
    "VM",
    "ConfigError",
    "ExitCode",
    "ExitReason",
    "RestoreOptions",
    "VmExit",
    "install_kick_handler",
    "parse_size",
]


class VM:
    """A virtual machine.  Build it, :meth:`start` it, :meth:`wait` for it, read :attr:`console`."""

    #: The machine underneath (the same operations, plus the device manager, vCPU threads, boot set-up).
    machine: Machine

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        memory: str | int = "128M",
        cpus: int = 1,
        cmdline: str | None = None,
        initrd: str | os.PathLike[str] | None = None,
        console: str | BinaryIO | None = None,
        boot: str = "auto",
        kvm_path: str | None = None,
        cpu_vendor: str | None = None,
        disks: Sequence[str | DiskSpec] = (),
        rootfs: str | DiskSpec | None = None,
        rng: bool = False,
        rng_rate: int | None = None,
        host_workarounds: bool = True,
        boot_marker: str | None = None,
        net: Sequence[str | NetSpec] = (),
        name: str = "pyrovm",
        vsock: str | VsockSpec | None = None,
        track_dirty_pages: bool = False,
        coalesced_io: bool = True,
    ) -> None:
        """Check the configuration and build the VM (nothing runs until :meth:`start`).

        *console*: None (kept in memory only), ``"stdio"`` (also to this process's stdout), ``"file:PATH"``
        or a binary file object.  *disks*: virtio-blk images (``PATH[,ro][,serial=ID]`` or
        :class:`DiskSpec`), the first is ``/dev/vda``; *rootfs*: a disk put first and booted as the root
        (``root=/dev/vda rw`` is added unless the command line names a root); *rng*: a virtio-rng device,
        *rng_rate* its byte-rate limit.  *net*: virtio-net NICs, as ``pyrovm run --net`` takes them
        (``"tap=tap0"``, ``"user,hostfwd=tcp::2222-:22"``) or :class:`NetSpec`; *name*: the VM's name
        (default MACs derive from it).  *vsock*: ``"cid=N[,uds=PATH]"`` or a :class:`VsockSpec`, then
        :attr:`vsock` connects to guest ports.  *track_dirty_pages*: KVM's dirty log on guest RAM, so that
        :meth:`snapshot` can take diff snapshots.  *coalesced_io*: KVM queues the guest's writes that may
        wait (the UART's THR while its interrupt is off, the CMOS index port) instead of exiting for each;
        pyrovm serves them before the next exit.  Bad input raises :class:`ConfigError` (or its subclass
        :class:`pyrovm.loader.KernelLoadError`); a host that cannot run VMs :class:`pyrovm.errors.HostError`
        (e.g. :class:`pyrovm.kvm.KvmUnavailable`); all are :class:`pyrovm.PyrovmError`.

        *host_workarounds*: on a PVM host, boot Linux kernels with the command-line options and CPU vendor
        they need there (see :mod:`pyrovm.host`); never applied elsewhere or to non-Linux kernels.
        *boot_marker*: a regular expression; the first console line matching it sets
        :attr:`boot_marker_at` (``time.monotonic()``).  The first write of 123 to the boot-timer device
        (:mod:`pyrovm.devices.boot_timer`) sets :attr:`boot_timer_at`.  A console line with
        ``Kernel panic - not syncing`` ends the VM with :attr:`ExitReason.PANIC` (when the guest then
        resets, or 10 s later).
        """
        sink = None if console is None or isinstance(console, str) else console
        config = VmConfig(
            kernel=Path(kernel),
            memory=parse_size(memory),
            cpus=cpus,
            cmdline=DEFAULT_CMDLINE if cmdline is None else cmdline,
            initrd=Path(initrd) if initrd is not None else None,
            boot=boot,
            cpu_vendor=cpu_vendor,
            disks=tuple(DiskSpec.of(d) for d in disks),
            rootfs=None if rootfs is None else DiskSpec.of(rootfs),
            rng=rng,
            rng_rate=rng_rate,
            host_workarounds=host_workarounds,
            boot_marker=boot_marker,
            console=console if isinstance(console, str) else "none",
            kvm_device=kvm_path or DEFAULT_KVM_DEVICE,
            net=tuple(NetSpec.of(n) for n in net),
            name=name,
            vsock=None if vsock is None else VsockSpec.of(vsock),
            track_dirty_pages=track_dirty_pages,
            coalesced_io=coalesced_io,
        )
        self.machine = build(config, console=sink)

    @classmethod
    def from_config(cls, config: VmConfig, console: BinaryIO | None = None) -> VM:
        """A VM built from *config* (*console*: an extra stream for the console output)."""
        vm = cls.__new__(cls)
        vm.machine = build(config, console=console)
        return vm

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def config(self) -> VmConfig:
        return self.machine.config

    @property
    def console(self) -> ConsoleLog:
        return self.machine.console

    @property
    def memory(self) -> GuestMemory:
        return self.machine.memory

    @property
    def cmdline(self) -> str:
        """The kernel command line the guest got (the configured one plus device announcements)."""
        return self.machine.boot.cmdline

    @property
    def boot_mode(self) -> str:
        """``bzimage``, ``pvh`` or ``linux64``."""
        return self.machine.boot.mode

    @property
    def host_workarounds_applied(self) -> bool:
        return self.machine.host_workarounds_applied

    @property
    def pio_bus(self) -> Bus:
        return self.machine.devices.pio_bus

    @property
    def mmio_bus(self) -> Bus:
        return self.machine.devices.mmio_bus

    # -- times and hooks -------------------------------------------------------------------------------
    @property
    def started_at(self) -> float | None:
        return self.machine.started_at

    @property
    def ended_at(self) -> float | None:
        return self.machine.ended_at

    @property
    def boot_marker_at(self) -> float | None:
        return self.machine.events.watcher.boot_marker_at

    @property
    def boot_timer_at(self) -> float | None:
        return self.machine.events.boot_timer_at

    @property
    def on_boot_marker(self) -> list[Callable[[float, str], object]]:
        """Callables ``(time, line)``, called from a vCPU thread when the boot marker is seen."""
        return self.machine.events.watcher.on_boot_marker

    @property
    def on_boot_timer(self) -> list[Callable[[float], object]]:
        """Callables ``(time,)``, called from a vCPU thread when the guest writes 123 to the boot timer."""
        return self.machine.events.on_boot_timer

    @property
    def panic_message(self) -> str | None:
        return self.machine.events.watcher.panic_message

    # -- running ---------------------------------------------------------------------------------------
    def start(self) -> VM:
        """Start the vCPU threads (returns at once)."""
        self.machine.start()
        return self

    def pause(self) -> None:
        """Stop the guest where it is: returns once no vCPU runs and no device touches guest memory."""
        self.machine.pause()

    def resume(self) -> None:
        """Continue a paused guest exactly where it was."""
        self.machine.resume()

    # -- snapshots -------------------------------------------------------------------------------------
    def snapshot(
        self, state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str], diff: bool = False
    ) -> SnapshotInfo:
        """Save the VM to a state file and a memory file (sparse); a running VM is paused for it and
        resumed after.  *diff*: only the pages written since the previous snapshot (or the restore), for
        a VM built with ``track_dirty_pages=True``; apply it to its base with
        :func:`pyrovm.snapshot.memfile.rebase`.  Returns what was written (sizes, time)."""
        was_running = not self.machine.paused
        if was_running:
            self.machine.pause()
        try:
            info: SnapshotInfo = self.machine.snapshot(state_path, mem_path, diff=diff)
        finally:
            if was_running:
                self.machine.resume()
        return info

    @classmethod
    def restored(
        cls,
        state_path: str | os.PathLike[str] | SnapshotState,
        mem_path: str | os.PathLike[str],
        *,
        console: BinaryIO | None = None,
        options: RestoreOptions | None = None,
    ) -> VM:
        """A VM built from a snapshot, not started: :meth:`start` continues it where the snapshot was
        taken.  See :meth:`restore`; *state_path* may also be a state already read
        (:func:`pyrovm.snapshot.load_state`)."""
        from .snapshot.core import SnapshotState, load_state

        state = state_path if isinstance(state_path, SnapshotState) else load_state(state_path)
        vm = cls.__new__(cls)
        vm.machine = restore(state, mem_path, options, console=console)
        return vm

    @classmethod
    def restore(
        cls,
        state_path: str | os.PathLike[str] | SnapshotState,
        mem_path: str | os.PathLike[str],
        *,
        console: str | BinaryIO | None = None,
        resume: bool = False,
        options: RestoreOptions | None = None,
    ) -> VM:
        """A VM from a snapshot, started and paused where the snapshot was taken (running with *resume*).
        Its memory is mapped copy-on-write from *mem_path* (never written), so many VMs restored from one
        snapshot share its pages.  *console*: as for :class:`VM`; *options*: a
        :class:`pyrovm.builder.RestoreOptions` (new taps, vsock socket, disk images, VM name, dirty-page
        tracking, ``clock_realtime``).  Bad input raises :class:`pyrovm.errors.SnapshotError` (a
        ConfigError); nothing is left half-built."""
        opts = options or RestoreOptions()
        if isinstance(console, str):
            opts = dataclasses.replace(opts, console=console)
        vm = cls.restored(
            state_path, mem_path, console=None if isinstance(console, str) else console, options=opts
        )
        try:
            vm.machine.start(paused=not resume)
        except BaseException:
            vm.machine.close()
            raise
        return vm

    def stop(self, reason: ExitReason = ExitReason.STOPPED, message: str = "stopped by the host") -> VmExit:
        """End the VM from any thread; returns how it ended (another reason may have come first)."""
        return self.machine.stop(reason, message)

    def wait(self, timeout: float | None = None) -> VmExit:
        """Block until the VM ends; on *timeout* stop it and return a ``timeout`` result."""
        return self.machine.wait(timeout)

    def run(self, timeout: float | None = None) -> VmExit:
        """:meth:`start` then :meth:`wait`."""
        return self.start().wait(timeout)

    @property
    def result(self) -> VmExit | None:
        """How the VM ended, or None while it runs."""
        return self.machine.result

    @property
    def running(self) -> bool:
        return self.machine.running

    @property
    def paused(self) -> bool:
        return self.machine.paused

    @property
    def state(self) -> str:
        """``created``, ``running``, ``paused`` or ``stopped``."""
        return self.machine.state

    def send_input(self, data: bytes) -> None:
        """Type *data* on the serial console."""
        self.machine.send_input(data)

    def exit_counts(self) -> dict[str, int]:
        """vCPU exits to user space, summed over vCPUs, by kind."""
        return self.machine.exit_counts()

    @property
    def vsock(self) -> VsockHost:
        """The host side of the vsock device: ``connect(port, timeout)`` gives a socket to a guest port,
        ``listen(port)`` a listening socket for the guest's connections to host port *port*."""
        from .netback.vsock import VsockHost

        spec = self.machine.config.vsock
        if spec is None:
            raise ConfigError("this VM has no vsock device (give vsock='cid=N')")
        return VsockHost(spec.socket_path(self.machine.config.name), spec.cid)

    def metrics(self) -> dict[str, object]:
        """Counters of the VM: how it ended, vCPU exits, and per-device requests/bytes/errors/interrupts."""
        return self.machine.metrics()

    def close(self) -> None:
        """Stop if running and release KVM file descriptors, devices, guest memory and the console file."""
        self.machine.close()

    def __enter__(self) -> VM:
        if self.machine.state == "created":
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
