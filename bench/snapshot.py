"""Snapshots: pyrovm's snapshot and restore beside QEMU's migration to a file, one run, alternating.

    python bench/snapshot.py [--repeat R] [--memory 128M,1G] [--clones N] [--quick] [--markdown]

The test guest runs ``test=count`` (a ``count N`` console line every few ms, for ever).  Per repetition
and memory size, each VMM (pyrovm and QEMU alternate which goes first):

* boots the guest, waits for a few ``count`` lines, pauses it and snapshots it.  pyrovm: ``pyrovm run
  --api-sock``, ``PATCH /vm Paused``, then the time of ``PUT /snapshot/create`` (state file + sparse
  memory file, fsync'ed).  QEMU: ``-qmp``, ``stop``, then the time from ``migrate "exec:cat > FILE"`` until
  ``query-migrate`` says completed and the ``cat`` has exited (QEMU does not fsync the file);
* restores it in a fresh process and times process start -> the restored guest's next complete ``count``
  line on the console.  pyrovm: ``pyrovm snapshot restore STATE --mem MEM --resume --console stdio``.
  QEMU: the same command line with ``-incoming "exec:cat FILE"``, then ``cont`` over QMP once the incoming
  migration is done (the source was paused, so QEMU stays paused until then);
* loads it into a VMM that is already up (what Firecracker's load figure measures: no process start):
  pyrovm ``python -m pyrovm.api.firecracker`` and ``PUT /snapshot/load`` with ``resume_vm``; QEMU
  ``-incoming defer``, ``migrate-incoming`` and ``cont``: the time until the request returns (QEMU: until
  ``cont`` returned) and until the next ``count`` line (with ``resume_vm`` pyrovm's guest runs before the
  answer is sent, so its next line can come first);
* reports the snapshot's size on disk (allocated: ``st_blocks * 512``, and apparent);
* pyrovm only: starts N clones of the snapshot at once (``pyrovm snapshot restore ... --resume``, separate
  processes), clones per second = N / (time until every clone printed a new ``count`` line), and, while
  they all run, each clone's PSS and RSS (``/proc/PID/smaps_rollup``) and those of its guest RAM mapping
  (which is the memory file mapped MAP_PRIVATE, shared by the clones).

Every restore checks that the guest went on counting from the snapshot (no reboot).  Cells are the median
over the repetitions with (min-max); the ratio is pyrovm / QEMU of the medians (times and sizes: below 1
is pyrovm ahead).  The ``count`` lines come every ~2.5 ms, so the "next line" times carry 0-2.5 ms of the
guest's own loop.  Defaults: 128M and 1G, 5 runs, 10 clones; ``--quick``: 128M only, 3 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import QEMU, env, pyrovm_cmd, qemu_cmd, table, testguest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pyrovm.api import Client
from pyrovm.api.client import ApiFault
from pyrovm.api.server import socket_answers

COUNT = re.compile(rb"count (\d+)")
WARMUP_LINES = 20  # count lines the source guest prints before it is snapshotted
TIMEOUT = 60.0
FIRECRACKER_LOAD = (
    "Firecracker's snapshot docs give a resume (load) latency target under 8 ms, 5 ms p90 (2 vCPU, 512 MiB, "
    "1 block, 1 net device, m5d.metal): the load request alone, no process start"
)


class BenchError(Exception):
    """A run failed: the message says which VMM and how (the bench prints it, no traceback)."""


# -- child processes and their consoles -----------------------------------------------------------------
class Console:
    """Reads a child's stdout in a thread: when the first complete ``count N`` line came, the last N."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._cond = threading.Condition()
        self.first_at: float | None = None
        self.first: int | None = None
        self.last = 0
        self.lines = 0
        self.eof = False
        self.tail = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            for chunk in iter(lambda: self._stream.read1(65536), b""):
                now = time.perf_counter()
                buf += chunk
                *complete, buf = buf.split(b"\n")
                with self._cond:
                    for line in complete:
                        m = COUNT.fullmatch(line)  # a line cut by the snapshot does not match
                        if m:
                            if self.first_at is None:
                                self.first_at, self.first = now, int(m[1])
                            self.last = int(m[1])
                            self.lines += 1
                    self.tail = (self.tail + chunk)[-600:]
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_lines(self, n: int, timeout: float = TIMEOUT) -> float:
        """Block until *n* count lines came (EOF or timeout: BenchError); the first one's time."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.lines >= n or self.eof, timeout):
                raise BenchError(
                    f"no {n} 'count' lines within {timeout:.0f} s; console: {self.tail[-300:]!r}"
                )
            if self.lines < n:
                raise BenchError(f"the console ended after {self.lines} 'count' lines: {self.tail[-300:]!r}")
            assert self.first_at is not None
            return self.first_at

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    console: Console
    stderr_path: Path

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()][-6:]
        return " | ".join(lines)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}: {self.stderr_tail()}")


@dataclass
class Children:
    """Every process the bench starts; :meth:`kill_all` in a ``finally`` ends them."""

    tmp: Path
    live: list[Child] = field(default_factory=list)
    _n: int = 0

    def start(self, name: str, cmd: list[str]) -> Child:
        self._n += 1
        err = self.tmp / f"stderr.{self._n}"
        with open(err, "wb") as ef:
            try:
                p = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=ef, stdin=subprocess.DEVNULL, env=env()
                )
            except OSError as e:
                raise BenchError(f"{name}: cannot start {cmd[0]}: {e.strerror or e}") from None
        child = Child(name, p, Console(p.stdout), err)
        self.live.append(child)
        return child

    def kill(self, child: Child) -> None:
        if child.proc.poll() is None:
            child.proc.kill()
        try:
            child.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        child.console.join()
        if child.proc.stdout is not None:
            child.proc.stdout.close()
        if child in self.live:
            self.live.remove(child)

    def kill_all(self) -> None:
        for child in list(self.live):
            self.kill(child)


def wait_for(what: str, ready: Any, child: Child, timeout: float = TIMEOUT, poll: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        child.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name}: {what} not ready after {timeout:.0f} s: {child.stderr_tail()}")
        time.sleep(poll)


def files_size(*paths: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of the files together."""
    st = [os.stat(p) for p in paths]
    return sum(s.st_blocks * 512 for s in st), sum(s.st_size for s in st)


def check_continued(name: str, restored: Console, snapshot_last: int) -> None:
    """The restored guest went on from the snapshot (its first whole line follows the source's last)."""
    first = restored.first
    if first is None or not snapshot_last < first <= snapshot_last + 3:
        raise BenchError(
            f"{name}: the restored guest printed 'count {first}' first, but the snapshot was taken after "
            f"'count {snapshot_last}' (it did not continue from the snapshot)"
        )


# -- QEMU's QMP -------------------------------------------------------------------------------------------
class Qmp:
    """A QMP connection over a Unix socket: commands and answers, events skipped."""

    def __init__(self, path: Path, child: Child, timeout: float = TIMEOUT) -> None:
        self.child = child
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                child.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{child.name}: no QMP socket at {path}: {child.stderr_tail()}"
                    ) from None
                time.sleep(0.001)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"{child.name}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self.f.readline()
        except OSError as e:
            raise BenchError(f"{self.child.name}: QMP: {e}: {self.child.stderr_tail()}") from None
        if not line:
            raise BenchError(f"{self.child.name}: QMP connection closed: {self.child.stderr_tail()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise BenchError(f"{self.child.name}: QMP {command}: {reply['error'].get('desc', reply)}")
            return reply.get("return")

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def wait_status(self, leaving: str, timeout: float = TIMEOUT) -> str:
        """Poll ``query-status`` until it is no longer *leaving*; the new status."""
        deadline = time.monotonic() + timeout
        while True:
            status: str = self.execute("query-status")["status"]
            if status != leaving:
                return status
            if time.monotonic() > deadline:
                raise BenchError(f"{self.child.name}: still {leaving!r} after {timeout:.0f} s")
            time.sleep(0.0005)


def no_children(pid: int) -> bool:
    """True when process *pid* has no live child (QEMU's ``sh -c 'cat > FILE'`` has exited)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                state = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                return False
    return True


# -- one repetition per VMM --------------------------------------------------------------------------------
@dataclass
class Setup:
    guest: Path
    cmdline: str
    memory: str
    tmp: Path
    clones: int


def pyrovm_rep(s: Setup, kids: Children) -> dict[str, float]:
    out: dict[str, float] = {}
    state, mem = s.tmp / "pyrovm.state", s.tmp / "pyrovm.mem"
    sock = s.tmp / "src.sock"
    # 1. snapshot a running guest
    src = kids.start("pyrovm run", pyrovm_cmd(s.guest, s.cmdline, s.memory, extra=["--api-sock", str(sock)]))
    wait_for("API socket", lambda: socket_answers(sock, 0.5), src)
    src.console.wait_lines(WARMUP_LINES)
    try:
        with Client(str(sock), timeout=120) as c:
            c.patch("/vm", state="Paused")
            t0 = time.perf_counter()
            c.put("/snapshot/create", snapshot_path=str(state), mem_file_path=str(mem), snapshot_type="Full")
            out["create"] = (time.perf_counter() - t0) * 1e3
    except ApiFault as e:
        raise BenchError(f"pyrovm: PUT /snapshot/create: {e}") from None
    kids.kill(src)
    last = src.console.last
    out["disk"], out["apparent"] = (float(v) for v in files_size(state, mem))

    # 2. restore in a fresh process
    cmd = [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "snapshot",
        "restore",
        str(state),
        "--mem",
        str(mem),
        "--resume",
    ]
    t0 = time.perf_counter()
    r = kids.start("pyrovm snapshot restore", [*cmd, "--console", "stdio"])
    try:
        out["restore"] = (r.console.wait_lines(1) - t0) * 1e3
    except BenchError as e:
        raise BenchError(f"pyrovm snapshot restore: {e}; stderr: {r.stderr_tail()}") from None
    check_continued("pyrovm snapshot restore", r.console, last)
    kids.kill(r)

    # 3. load into an API server that is up
    lsock = s.tmp / "load.sock"
    srv = kids.start(
        "pyrovm-firecracker", [sys.executable, "-m", "pyrovm.api.firecracker", "--api-sock", str(lsock)]
    )
    wait_for("API socket", lambda: socket_answers(lsock, 0.5), srv)
    try:
        with Client(str(lsock), timeout=120) as c:
            t0 = time.perf_counter()
            c.put(
                "/snapshot/load",
                snapshot_path=str(state),
                mem_backend={"backend_type": "File", "backend_path": str(mem)},
                resume_vm=True,
            )
            out["load"] = (time.perf_counter() - t0) * 1e3
    except ApiFault as e:
        raise BenchError(f"pyrovm: PUT /snapshot/load: {e}") from None
    out["load_line"] = (srv.console.wait_lines(1) - t0) * 1e3
    check_continued("pyrovm PUT /snapshot/load", srv.console, last)
    kids.kill(srv)
    sock.unlink(missing_ok=True)
    lsock.unlink(missing_ok=True)

    # 4. clones
    if s.clones:
        out.update(pyrovm_clones(s, kids, cmd, last))
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    return fields


def guest_mapping(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(RSS, PSS) of the guest RAM mapping(s) of *pid*: the mappings of exactly the guest's size."""
    rss = pss = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = head.split("-")
            size = int(end, 16) - int(start, 16)
        elif size == guest_bytes and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
        elif size == guest_bytes and line.startswith("Pss:"):
            pss += int(line.split()[1]) * 1024
    return rss, pss


def pyrovm_clones(s: Setup, kids: Children, cmd: list[str], last: int) -> dict[str, float]:
    guest_bytes = parse_size(s.memory)
    clones: list[Child] = []
    t0 = time.perf_counter()
    for i in range(s.clones):
        clones.append(kids.start(f"pyrovm clone {i}", [*cmd, "--console", "stdio", "--name", f"clone{i}"]))
    try:
        done = max(c.console.wait_lines(1) for c in clones)
    except BenchError as e:
        tails = "; ".join(f"{c.name}: {c.stderr_tail()}" for c in clones if c.proc.poll() is not None)
        raise BenchError(f"pyrovm clones: {e} {tails}") from None
    for c in clones:
        check_continued(c.name, c.console, last)
    time.sleep(0.2)  # all running: the memory they touched is in
    roll = [smaps_rollup(c.proc.pid) for c in clones]
    guest = [guest_mapping(c.proc.pid, guest_bytes) for c in clones]
    for c in clones:
        c.check_alive()
        kids.kill(c)
    return {
        "clones_per_s": s.clones / (done - t0),
        "pss": statistics.mean(r["Pss"] for r in roll),
        "rss": statistics.mean(r["Rss"] for r in roll),
        "guest_rss": statistics.mean(g[0] for g in guest),
        "guest_pss": statistics.mean(g[1] for g in guest),
    }


def qemu_rep(s: Setup, kids: Children) -> dict[str, float]:
    assert QEMU is not None
    out: dict[str, float] = {}
    mig = s.tmp / "qemu.mig"
    qsock = s.tmp / "qmp.sock"

    def qemu(extra: list[str]) -> list[str]:
        cmd = qemu_cmd(
            s.guest, s.cmdline, s.memory, extra=["-qmp", f"unix:{qsock},server=on,wait=off", *extra]
        )
        cmd[0] = QEMU
        return cmd

    # 1. snapshot (migrate to a file) a running guest
    qsock.unlink(missing_ok=True)
    src = kids.start("qemu (source)", qemu([]))
    qmp = Qmp(qsock, src)
    src.console.wait_lines(WARMUP_LINES)
    qmp.execute("stop")
    t0 = time.perf_counter()
    qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(mig))}")
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise BenchError(
                f"qemu: migration to {mig} {status}: {info.get('error-desc', '')} {src.stderr_tail()}"
            )
        time.sleep(0.0005)
    wait_for("the migration's cat", lambda: no_children(src.proc.pid), src, poll=0.0005)
    out["create"] = (time.perf_counter() - t0) * 1e3
    qmp.close()
    kids.kill(src)
    last = src.console.last
    out["disk"], out["apparent"] = (float(v) for v in files_size(mig))

    # 2. restore in a fresh process: -incoming, then cont once the migration is in
    qsock.unlink(missing_ok=True)
    cmd = qemu(["-incoming", f"exec:cat {shlex.quote(str(mig))}"])
    t0 = time.perf_counter()
    r = kids.start("qemu -incoming", cmd)
    qmp = Qmp(qsock, r)
    status = qmp.wait_status("inmigrate")
    if status == "paused":
        qmp.execute("cont")
    elif status != "running":
        raise BenchError(f"qemu: the incoming migration ended in state {status!r}: {r.stderr_tail()}")
    out["restore"] = (r.console.wait_lines(1) - t0) * 1e3
    check_continued("qemu -incoming", r.console, last)
    qmp.close()
    kids.kill(r)

    # 3. load into a QEMU that is up: -incoming defer, migrate-incoming, cont
    qsock.unlink(missing_ok=True)
    srv = kids.start("qemu -incoming defer", qemu(["-incoming", "defer"]))
    qmp = Qmp(qsock, srv)
    t0 = time.perf_counter()
    qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(mig))}")
    status = qmp.wait_status("inmigrate")
    if status == "paused":
        qmp.execute("cont")
    elif status != "running":
        raise BenchError(f"qemu: migrate-incoming ended in state {status!r}: {srv.stderr_tail()}")
    out["load"] = (time.perf_counter() - t0) * 1e3
    out["load_line"] = (srv.console.wait_lines(1) - t0) * 1e3
    check_continued("qemu migrate-incoming", srv.console, last)
    qmp.close()
    kids.kill(srv)
    qsock.unlink(missing_ok=True)
    return out


# -- output ------------------------------------------------------------------------------------------------
MEASURES: list[tuple[str, str, str]] = [
    ("create", "snapshot create, guest paused (ms)", "ms"),
    ("restore", "restore in a fresh process -> next `count` line (ms)", "ms"),
    ("load", "load into a running VMM, request returned (ms)", "ms"),
    ("load_line", "load into a running VMM -> next `count` line (ms)", "ms"),
    ("disk", "snapshot on disk, allocated", "size"),
    ("apparent", "snapshot on disk, apparent size", "size"),
    ("clones_per_s", "clones started per second ({clones} at once)", "rate"),
    ("pss", "PSS per clone (MiB)", "mib"),
    ("rss", "RSS per clone (MiB)", "mib"),
    ("guest_pss", "guest RAM mapping PSS per clone (KiB)", "kib"),
    ("guest_rss", "guest RAM mapping RSS per clone (KiB)", "kib"),
]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 128M, 1G)")
    return int(m[1]) << {"": 20, "K": 10, "M": 20, "G": 30}[m[2]]


def human(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if unit == 'GiB' else 1 if n < 10 << shift else 0}f} {unit}"
    return f"{n:.0f} B"


def fmt_one(v: float, kind: str) -> str:
    if kind == "size":
        return human(v)
    if kind == "mib":
        return f"{v / (1 << 20):.1f}"
    if kind == "kib":
        return f"{v / 1024:.0f}"
    return f"{v:.1f}"


def cell(values: list[float], kind: str) -> str:
    if not values:
        return "-"
    med = fmt_one(statistics.median(values), kind)
    lo, hi = fmt_one(min(values), kind), fmt_one(max(values), kind)
    if len(values) == 1 or lo == hi:
        return med
    return f"{med} ({lo}-{hi})"


def rows_for(runs: dict[str, list[dict[str, float]]], clones: int) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, label, kind in MEASURES:
        p = [r[key] for r in runs["pyrovm"] if key in r]
        q = [r[key] for r in runs["qemu"] if key in r]
        if not p and not q:
            continue
        ratio = (
            f"{statistics.median(p) / statistics.median(q):.2f}x" if p and q and statistics.median(q) else "-"
        )
        rows.append((label.format(clones=clones), cell(p, kind), cell(q, kind), ratio))
    return rows


def markdown(rows: list[tuple[str, str, str, str]], header: tuple[str, str, str, str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", "--reps", type=int, default=None, help="runs per VMM and size (default 5)")
    ap.add_argument("--memory", default=None, help="guest memory sizes, comma-separated (default 128M,1G)")
    ap.add_argument("--clones", type=int, default=10, help="clones started at once (0: skip; default 10)")
    ap.add_argument("--quick", action="store_true", help="128M only, 3 runs (unless given)")
    ap.add_argument("--cmdline", default="test=count", help="the test guest's command line")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown too")
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 5)
    sizes = (args.memory or ("128M" if args.quick else "128M,1G")).split(",")
    for size in sizes:
        parse_size(size)
    if QEMU is None:
        print("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (scripts/install-deps.sh); "
              "measuring pyrovm only", file=sys.stderr)  # fmt: skip
    guest = testguest.build()
    failures: list[str] = []
    header = ("measure", "pyrovm", "qemu", "pyrovm/qemu")
    tables: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    # SIGTERM (e.g. a timeout around the bench) must still reach the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="pyrovm-bench-snapshot-") as d:
        kids = Children(Path(d))
        try:
            for size in sizes:
                runs: dict[str, list[dict[str, float]]] = {"pyrovm": [], "qemu": []}
                vmms = {"pyrovm": pyrovm_rep, **({"qemu": qemu_rep} if QEMU else {})}
                for i in range(repeat):
                    order = list(vmms) if i % 2 == 0 else list(reversed(vmms))
                    for name in order:
                        setup = Setup(
                            guest, args.cmdline, size, Path(d), args.clones if name == "pyrovm" else 0
                        )
                        try:
                            runs[name].append(vmms[name](setup, kids))
                        except BenchError as e:
                            failures.append(f"{size} run {i + 1} {name}: {e}")
                            print(f"  {size} run {i + 1} {name}: FAILED: {e}", file=sys.stderr, flush=True)
                            continue
                        finally:
                            kids.kill_all()
                        shown = {k: round(v, 1) for k, v in runs[name][-1].items()}
                        print(f"  {size} run {i + 1} {name}: {shown}", file=sys.stderr, flush=True)
                tables.append((size, rows_for(runs, args.clones)))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            kids.kill_all()
    qemu_version = ""
    if QEMU:
        v = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()
        qemu_version = f" ({v[0]})" if v else ""
    for size, rows in tables:
        print(
            f"\nsnapshots, {size} guest, test guest {args.cmdline!r}; median (min-max) of {repeat} runs "
            f"each, pyrovm and QEMU{qemu_version} alternating"
        )
        print(table(rows, header))
        if args.markdown:
            print()
            print(markdown(rows, header))
    print(f"\nreference: {FIRECRACKER_LOAD}")
    if failures:
        print(f"\n{len(failures)} run(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
