"""The jailer's cgroup plans, on directories standing in for the hierarchies (no root needed): which files
get which values, v2 names on a v1 host, what is refused, and what is removed afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyrovm import cgroups
from pyrovm.errors import ConfigError


def _mounts(tmp: Path) -> str:
    for name in ("cpu,cpuacct", "memory", "pids", "unified"):
        (tmp / name).mkdir()
    (tmp / "unified" / "cgroup.controllers").write_text("cpu memory pids\n")
    return (
        f"cgroup {tmp}/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0\n"
        f"cgroup {tmp}/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n"
        f"cgroup {tmp}/pids cgroup rw,relatime,pids 0 0\n"
        f"cgroup2 {tmp}/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
        "proc /proc proc rw 0 0\n"
    )


def test_mounts_and_the_host_version(tmp_path: Path) -> None:
    v1, v2 = cgroups.mounts(_mounts(tmp_path))
    assert v1["cpu"] == v1["cpuacct"] == tmp_path / "cpu,cpuacct" and v1["memory"] == tmp_path / "memory"
    assert v2 == tmp_path / "unified" and cgroups.host_version(v2) == 1  # a hybrid host: v1 for controllers
    assert cgroups.host_version(Path("/sys/fs/cgroup")) == 2


def test_v1_plan_translates_v2_names_and_writes_before_joining(tmp_path: Path) -> None:
    settings = ["cpu.max=50000 100000", "memory.max=512M", "pids.max=64", "memory.swappiness=0"]
    plan = cgroups.plan(settings, None, "pyrovm", "vm1", _mounts(tmp_path))
    cpu, mem, pids = (tmp_path / n / "pyrovm" / "vm1" for n in ("cpu,cpuacct", "memory", "pids"))
    assert plan.version == 1 and plan.dirs == [cpu, mem, pids]
    assert plan.writes == [
        (cpu / "cpu.cfs_period_us", "100000"),
        (cpu / "cpu.cfs_quota_us", "50000"),
        (mem / "memory.limit_in_bytes", str(512 << 20)),
        (pids / "pids.max", "64"),
        (mem / "memory.swappiness", "0"),
    ]
    cgroups.make(plan)
    assert (mem / "memory.limit_in_bytes").read_text() == str(512 << 20)
    cgroups.join(plan, 4242)
    assert all((d / "cgroup.procs").read_text() == "4242" for d in plan.dirs)
    for d in plan.dirs:  # (what the kernel would do when the processes are gone: an empty directory)
        for f in d.iterdir():
            f.unlink()
    cgroups.remove(plan)
    assert not any((tmp_path / n / "pyrovm").exists() for n in ("cpu,cpuacct", "memory", "pids"))


def test_v2_plan_enables_the_controllers_above(tmp_path: Path) -> None:
    plan = cgroups.plan(["memory.max=max", "pids.max=10"], 2, "a/b", "vm2", _mounts(tmp_path))
    base = tmp_path / "unified"
    assert plan.dirs == [base / "a" / "b" / "vm2"]
    assert plan.made == [base / "a" / "b" / "vm2", base / "a" / "b", base / "a"]
    assert plan.enable == [
        (base / "cgroup.subtree_control", "+memory"),
        (base / "a" / "cgroup.subtree_control", "+memory"),
        (base / "a" / "b" / "cgroup.subtree_control", "+memory"),
        (base / "cgroup.subtree_control", "+pids"),
        (base / "a" / "cgroup.subtree_control", "+pids"),
        (base / "a" / "b" / "cgroup.subtree_control", "+pids"),
    ]
    assert plan.writes == [(base / "a/b/vm2/memory.max", "max"), (base / "a/b/vm2/pids.max", "10")]


def test_a_parent_another_jail_uses_stays_and_costs_no_wait(tmp_path: Path) -> None:
    plan = cgroups.plan(["pids.max=5"], 1, "pyrovm", "vm3", _mounts(tmp_path))
    cgroups.make(plan)
    (tmp_path / "pids" / "pyrovm" / "other").mkdir()  # another VM's cgroup beside this one
    for f in plan.dirs[0].iterdir():
        f.unlink()
    t0 = time.monotonic()
    cgroups.remove(plan)
    assert time.monotonic() - t0 < 0.5
    assert not plan.dirs[0].exists() and (tmp_path / "pids" / "pyrovm" / "other").exists()


@pytest.mark.parametrize(
    ("settings", "version", "parent", "message"),
    [
        (["memory"], None, "pyrovm", "FILE=VALUE"),
        (["memory.max=lots"], None, "pyrovm", "a size in bytes"),
        (["cpu.max=half"], None, "pyrovm", r"QUOTA \[PERIOD\]"),
        (["frob.max=1"], 1, "pyrovm", "no frob controller"),
        (["frob.max=1"], 2, "pyrovm", "no frob controller"),
        (["memory.swap.max=1M"], 1, "pyrovm", "no v1 equivalent"),
        (["pids.max=1\n2"], None, "pyrovm", "FILE=VALUE"),
        (["pids.max=1"], None, "../escape", "--parent-cgroup"),
        (["pids.max=1"], None, "/abs", "--parent-cgroup"),
    ],
)
def test_bad_settings(
    tmp_path: Path, settings: list[str], version: int | None, parent: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cgroups.plan(settings, version, parent, "vm", _mounts(tmp_path))
    assert not any(p.name == "vm" for p in tmp_path.rglob("*"))  # nothing made


def test_an_existing_cgroup_is_refused(tmp_path: Path) -> None:
    text = _mounts(tmp_path)
    (tmp_path / "pids" / "pyrovm" / "vm").mkdir(parents=True)
    with pytest.raises(ConfigError, match="exists"):
        cgroups.plan(["pids.max=1"], 1, "pyrovm", "vm", text)
