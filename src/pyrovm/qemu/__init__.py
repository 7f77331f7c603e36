"""``pyrovm qemu`` (also ``pyrovm-qemu-system-x86_64``): QEMU's command line for pyrovm.

:mod:`~pyrovm.qemu.args` reads QEMU's syntax, :mod:`~pyrovm.qemu.translate` turns the options into a
:class:`~pyrovm.config.VmConfig`, :mod:`~pyrovm.qemu.qmp` is a minimal QMP server and
:mod:`~pyrovm.qemu.cli` runs it all.
"""
