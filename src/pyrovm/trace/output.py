"""A trace written out: a narrated text timeline, JSON lines, or Chrome trace-event JSON.

:class:`Trace` holds what was recorded (pyrovm's calls and exits from :class:`~pyrovm.trace.recorder.
Recorder`, the kernel's events from :mod:`pyrovm.trace.tracefs`, KVM's statistics at the end) and merges
it into one timeline by time (both sides use ``CLOCK_MONOTONIC``).  ``text`` is for reading: a line per
step, the first call of each kind with a sentence saying what it does and the kernel functions it enters
(each marked ✓ present or ✗ absent in the running kernel); ``jsonl`` is one JSON object a line for
scripts; ``chrome`` is the Trace Event Format that Perfetto and chrome://tracing open, a track per thread
(the vCPUs, the I/O thread, the main thread), calls and ``KVM_RUN`` as slices, kernel events as instants.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from .kernel import KernelPaths
from .recorder import Call, Exit, Recorder
from .tracefs import KernelEvent

FORMATS = ("text", "jsonl", "chrome")


@dataclass
class Trace:
    recorder: Recorder
    kernel_events: list[KernelEvent] = field(default_factory=list)
    kernel_reason: str | None = None  # why the kernel side is missing (None: it is there)
    kernel_lost: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # KVM's binary stats at the end
    paths: KernelPaths | None = None

    @property
    def t0(self) -> int:
        """The first record's time (the open of /dev/kvm): times are shown from there."""
        calls = self.recorder.calls
        return calls[0].t if calls else self.recorder.started

    def timeline(self) -> list[Call | Exit | KernelEvent]:
        items: list[Call | Exit | KernelEvent] = [*self.recorder.calls, *self.recorder.exits]
        items += self.kernel_events
        return sorted(items, key=lambda r: r.t)

    def thread_names(self) -> dict[int, str]:
        names = dict(self.recorder.threads)
        names.update({c.tid: c.thread for c in self.recorder.calls})
        names.update({x.tid: x.thread for x in self.recorder.exits})
        names.setdefault(os.getpid(), "main")
        return names

    def write(self, out: IO[str], fmt: str) -> None:
        if fmt == "jsonl":
            for obj in self.json_records():
                out.write(json.dumps(obj) + "\n")
        elif fmt == "chrome":
            json.dump(self.chrome(), out)
            out.write("\n")
        else:
            for line in self.text_lines():
                out.write(line + "\n")

    # -- JSON lines ------------------------------------------------------------------------------------
    def json_records(self) -> Iterator[dict[str, Any]]:
        yield {"type": "header", **self._header()}
        names = self.thread_names()
        for r in self.timeline():
            rec: dict[str, Any] = {"t_ns": r.t - self.t0}
            if isinstance(r, KernelEvent):
                rec.update(type="kernel", thread=names.get(r.tid, str(r.tid)), **asdict(r))
            else:
                rec.update(type="call" if isinstance(r, Call) else "exit", **asdict(r))
            rec["t_ns"] = r.t - self.t0
            rec.pop("t", None)
            yield rec
        yield {"type": "summary", **self._summary()}

    def _header(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "kernel": os.uname().release,
            "kernel_side": self.kernel_reason or "recorded",
            "kernel_paths": None if self.paths is None else self.paths.describe_check(),
        }

    def _summary(self) -> dict[str, Any]:
        return {
            "calls": len(self.recorder.calls),
            "exits": self.recorder.counts_by_kind(),
            "exits_by_port": {f"{k} {p}": n for (k, p), n in self.recorder.port_counts.items()},
            "kernel_events": dict(Counter(e.event for e in self.kernel_events)),
            "kernel_events_lost": self.kernel_lost,
            "kvm_stats": self.stats,
        }

    # -- Chrome trace events ---------------------------------------------------------------------------
    def chrome(self) -> dict[str, Any]:
        pid = os.getpid()
        events: list[dict[str, Any]] = []
        for tid, name in self.thread_names().items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        for r in self.timeline():
            ts = (r.t - self.t0) / 1000
            if isinstance(r, Call):
                args = {"fd": r.fd, **r.args, "result": r.result, "error": r.error}
                events.append(
                    {
                        "ph": "X",
                        "name": r.name,
                        "ts": ts,
                        "dur": r.dur / 1000,
                        "pid": pid,
                        "tid": r.tid,
                        "args": args,
                    }
                )
            elif isinstance(r, Exit):
                name = f"KVM_RUN -> {r.kind}"
                events.append(
                    {
                        "ph": "X",
                        "name": name,
                        "ts": ts,
                        "dur": r.dur / 1000,
                        "pid": pid,
                        "tid": r.tid,
                        "args": r.details,
                    }
                )
            else:
                events.append(
                    {
                        "ph": "i",
                        "s": "t",
                        "name": r.event,
                        "ts": ts,
                        "pid": pid,
                        "tid": r.tid,
                        "args": {"details": r.details, "cpu": r.cpu},
                    }
                )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {**self._header(), **self._summary()},
        }

    # -- text ------------------------------------------------------------------------------------------
    def text_lines(self) -> Iterator[str]:
        yield from self._text_header()
        names = self.thread_names()
        explained: set[str] = set()
        exits = self.recorder.exits
        full = sum(self.recorder.exit_counts.values()) > len(exits)  # (exits past the listed ones: counted)
        until = exits[-1].t + exits[-1].dur if exits and full else None
        hidden = 0
        for r in self.timeline():
            at = f"{(r.t - self.t0) / 1e6:+10.3f} ms"
            if isinstance(r, KernelEvent):
                if until is not None and r.t > until:
                    hidden += 1
                    continue
                yield f"{at}  {names.get(r.tid, str(r.tid)):<10}   kernel: {r.event}: {r.details}"
                continue
            if isinstance(r, Exit):
                detail = " ".join(f"{k}={v}" for k, v in r.details.items())
                took = f"({r.dur / 1000:.1f} µs)"
                yield f"{at}  {r.thread:<10} vcpu{r.vcpu} KVM_RUN -> {r.kind} {detail} {took}"
                name = "KVM_RUN"
            else:
                yield f"{at}  {r.thread:<10} {_call_text(r)}"
                name = r.name
            if name not in explained:
                explained.add(name)
                yield from self._explain(name)
        if hidden:
            yield f"{'':26}(then {hidden} more kernel events, counted below; --format jsonl lists them all)"
        yield from self._text_summary()

    def _text_header(self) -> Iterator[str]:
        rec = self.recorder
        yield (
            f"pyrovm trace: {len(rec.calls)} KVM calls, {sum(rec.exit_counts.values())} exits "
            f"({len(rec.exits)} listed), {len(self.kernel_events)} kernel events"
        )
        if self.paths is not None:
            yield self.paths.describe_check()
        if self.kernel_reason:
            yield f"the kernel's side is missing: {self.kernel_reason}"
        yield ""

    def _explain(self, name: str) -> Iterator[str]:
        if self.paths is None:
            return
        what = self.paths.explain(name)
        if what:
            yield f"{'':26}# {what}"
        steps = self.paths.path(name)
        if steps:
            path = " -> ".join(f"{s.name} {'✓' if s.present else '✗'}" for s in steps)
            yield f"{'':26}# kernel: {path}"

    def _text_summary(self) -> Iterator[str]:
        yield ""
        counts = self.recorder.counts_by_kind()
        yield "exits to pyrovm by kind: " + (
            ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"
        )
        ports = self.recorder.port_counts.most_common(8)
        if ports:
            yield "  busiest: " + ", ".join(f"{k} {p}: {n}" for (k, p), n in ports)
        if self.kernel_events:
            by_event = Counter(e.event for e in self.kernel_events).most_common()
            yield "kernel events: " + ", ".join(f"{k} {n}" for k, n in by_event)
            if self.kernel_lost:
                yield f"  ({self.kernel_lost} kernel events lost: the trace buffer overflowed)"
        for scope, values in self.stats.items():
            shown = ", ".join(f"{k} {v}" for k, v in values.items() if v)
            yield f"KVM statistics ({scope}): {shown or 'all zero'}"


def _call_text(r: Call) -> str:
    args = " ".join(f"{k}={v}" for k, v in r.args.items())
    outcome = f"error: {r.error}" if r.error else f"-> {r.result}"
    if r.name == "open":
        return f"open {r.args.get('path')} {outcome}"
    return f"{r.fd:<6} {r.name} {args} {outcome} ({r.dur / 1000:.1f} µs)".replace("  ", " ")
