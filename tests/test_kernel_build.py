"""Tests of the guest kernel build: config checks, cache key, patches, cache hits, and one real build."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from pyrovm.kernel import build as kb
from pyrovm.kernel.build import KernelBuildError, SourcePatch

# --------------------------------------------------------------------------------------------------
# Fragments and the merge verification


def test_parse_config() -> None:
    text = """
# comment line
CONFIG_A=y
CONFIG_B="string value"
CONFIG_C=0x10
# CONFIG_D is not set
#CONFIG_E is not set
NOT_A_CONFIG=y
"""
    assert kb.parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": '"string value"',
        "CONFIG_C": "0x10",
        "CONFIG_D": "n",
        "CONFIG_E": "n",
    }


def test_check_config_lists_what_did_not_land() -> None:
    fragment = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_D": "n", "CONFIG_E": "5"}
    config = {"CONFIG_A": "y", "CONFIG_C": "y", "CONFIG_D": "n", "CONFIG_E": "7"}
    missing = kb.check_config(fragment, config)
    assert missing == [
        "CONFIG_B: wanted y, got not set",
        "CONFIG_C: wanted not set, got y",
        "CONFIG_E: wanted 5, got 7",
    ]
    assert kb.check_config(fragment, {**config, "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_E": "5"}) == []


def test_fragments_hold_the_required_options() -> None:
    normal = kb.parse_config(kb.FRAGMENT.read_text())
    for name in (
        "64BIT",
        "PRINTK",
        "PRINTK_TIME",
        "TTY",
        "SERIAL_8250",
        "SERIAL_8250_CONSOLE",
        "BLK_DEV_INITRD",
        "RD_GZIP",
        "BINFMT_ELF",
        "BINFMT_SCRIPT",
        "PVH",
        "HYPERVISOR_GUEST",
        "PARAVIRT",
        "KVM_GUEST",
        "PROC_FS",
        "SYSFS",
        "DEVTMPFS",
        "DEVTMPFS_MOUNT",
        "TMPFS",
        "SMP",
        "X86_MPPARSE",
        "X86_LOCAL_APIC",
        "X86_IO_APIC",
        "VIRTIO_MENU",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "BLK_DEV",
        "VIRTIO_BLK",
        "NET",
        "INET",
        "UNIX",
        "PACKET",
        "NETDEVICES",
        "NET_CORE",
        "VIRTIO_NET",
        "IP_PNP",
        "IP_PNP_DHCP",
        "VSOCKETS",
        "VIRTIO_VSOCKETS",
        "HW_RANDOM",
        "HW_RANDOM_VIRTIO",
        "EXT4_FS",
        "SERIO",
        "SERIO_I8042",
        "RTC_CLASS",
        "RTC_DRV_CMOS",
        "RTC_HCTOSYS",
        "MAGIC_SYSRQ",
        "FUTEX",
        "EPOLL",
        "SHMEM",
        "MULTIUSER",
        "POSIX_TIMERS",
    ):
        assert normal.get(f"CONFIG_{name}") == "y", name
    assert normal["CONFIG_RANDOMIZE_BASE"] == "n"
    assert "CONFIG_CPU_SUP_AMD" not in normal
    pvm = kb.parse_config(kb.PVM_FRAGMENT.read_text())
    assert pvm["CONFIG_CPU_SUP_AMD"] == "n" and pvm["CONFIG_CPU_SUP_HYGON"] == "n"
    assert [n for n, _ in kb.fragment_texts(False)] == ["microvm.config"]
    assert [n for n, _ in kb.fragment_texts(True)] == ["microvm.config", "pvm.config"]


# --------------------------------------------------------------------------------------------------
# Cache key


def test_cache_key_depends_on_every_input() -> None:
    frags = kb.fragment_texts(False)
    base = kb.cache_key("debian:linux-source-6.1=6.1.1", frags, False, ())
    assert base == kb.cache_key("debian:linux-source-6.1=6.1.1", frags, False, ())
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        kb.cache_key("debian:linux-source-6.1=6.1.2", frags, False, ()),
        kb.cache_key(
            "debian:linux-source-6.1=6.1.1", [(frags[0][0], frags[0][1] + "CONFIG_X=y\n")], False, ()
        ),
        kb.cache_key("debian:linux-source-6.1=6.1.1", frags, True, ()),
        kb.cache_key("debian:linux-source-6.1=6.1.1", frags, False, kb.PVM_PATCHES),
        kb.cache_key("debian:linux-source-6.1=6.1.1", frags, False, (SourcePatch("a.c", "x", "y", "r"),)),
        kb.cache_key("debian:linux-source-6.1=6.1.1", frags, False, (SourcePatch("a.c", "x", "z", "r"),)),
    }
    assert base not in others and len(others) == 6


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYROVM_CACHE", str(tmp_path))
    assert kb.cache_root() == tmp_path / "kernel"
    monkeypatch.delenv("PYROVM_CACHE")
    assert kb.cache_root() == Path.home() / ".cache" / "pyrovm" / "kernel"


# --------------------------------------------------------------------------------------------------
# Patches


ALTERNATIVE_EXCERPT = """void __init alternative_instructions(void)
{
\tu64 ibt;

\tint3_selftest();

\t/*
"""


def test_pvm_patch_applies_once(tmp_path: Path) -> None:
    target = tmp_path / "arch/x86/kernel/alternative.c"
    target.parent.mkdir(parents=True)
    target.write_text(ALTERNATIVE_EXCERPT)
    patch = kb.PVM_PATCHES[0]
    kb.apply_patch(tmp_path, patch)
    text = target.read_text()
    assert "\tif (0)\n\t\tint3_selftest();\n" in text
    assert "\n\tint3_selftest();" not in text
    with pytest.raises(KernelBuildError, match="occurs 0 times"):  # a second application fails loudly
        kb.apply_patch(tmp_path, patch)


FPU_CORE_EXCERPT = """void fpu__drop(struct fpu *fpu)
{
\tpreempt_disable();

\tif (fpu == &current->thread.fpu) {
\t\t/* Ignore delayed exceptions from user space */
\t\tasm volatile("1: fwait\\n"
\t\t\t     "2:\\n"
\t\t\t     _ASM_EXTABLE(1b, 2b));
\t\tfpregs_deactivate(fpu);
\t}
"""


def test_pvm_fwait_patch(tmp_path: Path) -> None:
    target = tmp_path / "arch/x86/kernel/fpu/core.c"
    target.parent.mkdir(parents=True)
    target.write_text(FPU_CORE_EXCERPT)
    kb.apply_patch(tmp_path, kb.PVM_PATCHES[1])
    text = target.read_text()
    assert "fwait" not in text.replace("cannot execute fwait", "")
    assert 'asm volatile("1: nop\\n"' in text
    assert '"2:\\n"' in text and "_ASM_EXTABLE(1b, 2b)" in text


def test_patch_fails_loudly_on_unknown_text(tmp_path: Path) -> None:
    (tmp_path / "f.c").write_text("int x;\nint x;\n")
    with pytest.raises(KernelBuildError, match=r"f\.c does not apply.*occurs 0 times"):
        kb.apply_patch(tmp_path, SourcePatch("f.c", "int y;\n", "", "test"))
    with pytest.raises(KernelBuildError, match="occurs 2 times"):
        kb.apply_patch(tmp_path, SourcePatch("f.c", "int x;\n", "", "test"))
    with pytest.raises(KernelBuildError, match="cannot be read"):
        kb.apply_patch(tmp_path, SourcePatch("missing.c", "a", "b", "test"))
    assert (tmp_path / "f.c").read_text() == "int x;\nint x;\n"


# --------------------------------------------------------------------------------------------------
# Cache hits and errors, without building


def fake_tree(root: Path) -> Path:
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "Makefile").write_text("# fake\n")
    return root


def test_cache_hit_returns_at_once_and_copies_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYROVM_CACHE", str(tmp_path / "cache"))
    tree = fake_tree(tmp_path / "linux")
    identity = f"tree:{tree}:{(tree / 'Makefile').stat().st_mtime_ns}"
    key = kb.cache_key(identity, kb.fragment_texts(True), True, kb.PVM_PATCHES)
    entry = tmp_path / "cache" / "kernel" / key
    entry.mkdir(parents=True)
    for name in kb.CACHED_FILES:
        (entry / name).write_bytes(name.encode())

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(kb, "_build_into", no_build)
    lines: list[str] = []
    out = tmp_path / "out" / "kernel.bin"
    path = kb.build_kernel(source=tree, output=out, pvm=True, progress=lines.append)
    assert path == entry / "bzImage"
    assert out.read_bytes() == b"bzImage"
    assert (tmp_path / "out" / "kernel.bin.vmlinux").read_bytes() == b"vmlinux"
    assert any("cache: hit" in ln for ln in lines)
    assert all(ln.startswith("[") and "s] " in ln for ln in lines)
    # The other variant is a different key: a miss.
    with pytest.raises(AssertionError, match="must not build"):
        kb.build_kernel(source=tree, pvm=False)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KernelBuildError, match="does not exist"):
        kb.build_kernel(source=tmp_path / "nope", pvm=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KernelBuildError, match="not a Linux kernel source tree"):
        kb.build_kernel(source=tmp_path / "empty", pvm=False)


def test_cli_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pyrovm")
    kb.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernel", "build", "--source", str(tmp_path / "nope"), "--no-pvm", "-j", "3"])
    assert args.pvm is False and args.jobs == 3
    assert args.func(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "does not exist" in captured.err


# --------------------------------------------------------------------------------------------------
# The real build (minutes the first time; the cache makes later runs instant)


@pytest.mark.slow
def test_real_build() -> None:
    if not kb.DEFAULT_SOURCE_TARBALL.is_file() and not kb._is_root():
        pytest.skip(f"{kb.DEFAULT_SOURCE_TARBALL} is missing and apt-get needs root")
    lines: list[str] = []
    bzimage = kb.build_kernel(progress=lines.append)
    entry = bzimage.parent
    for name in kb.CACHED_FILES:
        assert (entry / name).is_file(), name
    vmlinux = entry / "vmlinux"
    assert vmlinux.read_bytes()[:5] == b"\x7fELF\x02"  # ELF, 64-bit
    assert b"HdrS" in bzimage.read_bytes()[:0x300]  # the x86 boot protocol header
    config = kb.parse_config((entry / ".config").read_text())
    wanted = kb.parse_config("".join(text for _, text in kb.fragment_texts(kb.pvm_host())))
    assert kb.check_config(wanted, config) == []
    system_map = (entry / "System.map").read_text()
    if kb.pvm_host():  # the PVM variant: no int3 self-test (its asm label would be in System.map)
        assert "int3_selftest" not in system_map
        assert config.get("CONFIG_CPU_SUP_AMD", "n") == "n"
    if shutil.which("readelf"):
        notes = subprocess.run(
            ["readelf", "-n", str(vmlinux)], capture_output=True, text=True, check=True
        ).stdout
        assert "Xen" in notes and "0x00000012" in notes  # XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry
    # A second call is a cache hit.
    again: list[str] = []
    assert kb.build_kernel(progress=again.append) == bzimage
    assert any("cache: hit" in ln for ln in again)
