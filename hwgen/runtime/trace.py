"""A record of what ran where and when, written as a Chrome-trace / Perfetto JSON file.

Open the file in https://ui.perfetto.dev or chrome://tracing: one process per run,
one track per lane (``host (cpu)``, ``accel (golden)``, ``link``), one slice per
node or transfer with its op, shape, bytes or cycles as arguments.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..files import atomic_file


class Tracer:
    """Thread-safe collector of timed slices (seconds from the tracer's creation)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, lane: str, name: str, start: float, end: float, **args) -> None:
        with self._lock:
            self.events.append({"lane": lane, "name": name, "start": start, "end": end, "args": args})

    def busy(self, lane_prefix: str) -> list[tuple[float, float]]:
        """Merged busy intervals of the lanes starting with ``lane_prefix``."""
        iv = sorted((e["start"], e["end"]) for e in self.events if e["lane"].startswith(lane_prefix))
        merged: list[list[float]] = []
        for s, e in iv:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return [(s, e) for s, e in merged]

    def overlap(self, a: str, b: str) -> float:
        """Seconds during which lanes ``a*`` and ``b*`` were both busy."""
        total = 0.0
        ib = self.busy(b)
        for s, e in self.busy(a):
            for s2, e2 in ib:
                total += max(0.0, min(e, e2) - max(s, s2))
        return total

    def to_chrome(self) -> dict:
        lanes = sorted({e["lane"] for e in self.events}, key=lambda l: (not l.startswith("host"),
                                                                         not l.startswith("accel"), l))
        tid = {l: i + 1 for i, l in enumerate(lanes)}
        out = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "hwgen run"}}]
        out += [{"ph": "M", "pid": 1, "tid": tid[l], "name": "thread_name", "args": {"name": l}}
                for l in lanes]
        for e in sorted(self.events, key=lambda e: e["start"]):
            out.append({"ph": "X", "pid": 1, "tid": tid[e["lane"]], "name": e["name"],
                        "cat": e["args"].get("op", e["lane"]), "ts": round(e["start"] * 1e6, 3),
                        "dur": round(max(e["end"] - e["start"], 0.0) * 1e6, 3), "args": e["args"]})
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def write(self, path: str | os.PathLike) -> Path:
        """Write the trace atomically (a temporary file renamed into place)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_chrome(), default=_default))
        return path


def _default(o):
    try:
        return o.item()
    except AttributeError:
        return str(o)
