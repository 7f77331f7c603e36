"""Every fixed guest physical address pyrovm uses on x86-64, in one place.

Low memory (below 1 MiB)::

    0x00000500  GDT (boot)              0x00007000  Linux zero page (boot_params)
    0x00000520  IDT (boot, empty)       0x00008000  free (guests put their AP trampoline here)
    0x00006000  PVH hvm_start_info      0x00009000  PML4, then PDPT and 4 page directories
    0x00006100  PVH memory map          0x0000f000  top of the 64-bit boot stack
    0x00020000  kernel command line     0x0009fc00  MP table (EBDA), reserved up to 1 MiB
    0x00100000  kernel / ELF image ...

Above RAM: a 1 GiB hole below 4 GiB for devices (virtio-mmio slots, IOAPIC, LAPIC, KVM's TSS pages);
RAM that does not fit below the hole continues at 4 GiB.
"""

GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6100
PVH_MEMMAP_MAX_ENTRIES = 64
ZERO_PAGE_ADDR = 0x7000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # 4 pages: identity map of the low 4 GiB with 2 MiB pages
BOOT_STACK_POINTER = 0xFFF0
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000
MPTABLE_START = 0x9FC00
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x100000  # kernels load at 1 MiB
INITRD_ALIGN = 0x1000

MMIO_GAP_START = 0xC000_0000  # 3 GiB
MMIO_GAP_END = 0x1_0000_0000  # 4 GiB
#: Boot-timer device (pyrovm.devices.boot_timer): the guest writes the byte 123 here once booted.
BOOT_TIMER_MMIO_ADDR = 0xC000_1000
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 0x1000
VIRTIO_MMIO_MAX_SLOTS = 64
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IDENTITY_MAP_ADDR = 0xFFFB_C000  # one page for KVM (real-mode identity page table on VMX)
TSS_ADDR = 0xFFFB_D000  # three pages for KVM's real-mode TSS

# Port I/O
UART_COM1_PORT = 0x3F8
UART_COM1_IRQ = 4
I8042_PORT = 0x60  # data 0x60, command/status 0x64
I8042_COMMAND_PORT = 0x64
I8042_KBD_IRQ = 1
RTC_PORT = 0x70
EXIT_PORT = 0xF4  # QEMU isa-debug-exit compatible

# IRQs
MAX_LEGACY_IRQ = 23  # IOAPIC pins


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Guest RAM regions ``(guest_addr, size)`` for *size* bytes: below the device hole, then above 4 GiB."""
    low = min(size, MMIO_GAP_START)
    regions = [(0, low)]
    if size > low:
        regions.append((MMIO_GAP_END, size - low))
    return regions
