"""CPU time from /proc: a process tree's since a moment (``CpuProbe``), and, sampled through
a phase, each component's and the whole machine's over any window of it (``CpuSampler``),
which is how the benchmark gives the CPU per delivered email of each process it runs and
of each service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from .measure import Sampler, descendants

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / TICKS


class CpuProbe:
    """CPU used by one process tree since the probe was made, as a share of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.cpu = cpu_seconds(descendants(pid))

    def percent(self) -> float:
        wall = time.monotonic() - self.started
        used = cpu_seconds(descendants(self.pid)) - self.cpu
        return round(100.0 * used / wall, 1) if wall > 0 else 0.0


# The fields of /proc/stat's "cpu" line that are work: user, nice, system, irq, softirq and
# steal (guest time is inside user and nice already; idle and iowait are not work).
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def machine_ticks() -> tuple[int, int]:
    """CPU ticks every core has spent working since boot, and the number of cores."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    fields = [int(x) for x in lines[0].split()[1:]]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields[i] for i in BUSY_FIELDS if i < len(fields)), cores


def _stat(pid: int) -> tuple[int, int, int] | None:
    """A process's own CPU ticks, those of the children it has waited for, and its start
    (ticks after boot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def processes_named(name: str, containing: str = "") -> list[int]:
    """Pids of the processes called ``name`` whose command line contains ``containing``,
    oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != name:
                    continue
        except OSError:
            continue
        stat = _stat(int(entry))
        if stat and containing in cmdline(int(entry)):
            found.append((stat[2], int(entry)))
    return [pid for _, pid in sorted(found)]


def pg_database(pid: int) -> str | None:
    """The database a PostgreSQL backend or autovacuum worker serves, from the process
    title it sets (``postgres: [cluster: ]user database host(port) state``); None for the
    server's other processes."""
    title = cmdline(pid)
    if not title.startswith("postgres: "):
        return None
    words = title.rsplit(": ", 1)[-1].split()
    if words[:2] == ["autovacuum", "worker"] and len(words) > 2:
        return words[2]
    if len(words) >= 3 and (words[2].endswith(")") or words[2] == "[local]"):
        return words[1]
    return None


class CpuSampler(Sampler):
    """Samples, every ``interval`` seconds, the CPU time used so far by each named group of
    process trees (``roots()``: a name to its trees' root pids, asked each time, so a
    process started later is seen) and by the whole machine, so that the CPU of any window
    inside the sampling is read afterwards by interpolating between the samples around
    its ends (``usage``).

    A tree counts each live process's own CPU and its waited-for children's, so a process
    that exits inside the tree (a database backend, a pool process) still counts; a root
    that exits keeps its last reading. A root started after the sampling began counts from
    its start. ``shares`` names a part of a group to count on its own: the processes of
    that group's trees that a predicate picks (a lower bound: a process's last moments
    before it exits are missed)."""

    def __init__(
        self,
        roots: Callable[[], dict[str, list[int]]],
        interval: float = 0.1,
        shares: dict[str, tuple[str, Callable[[int], bool]]] | None = None,
    ) -> None:
        super().__init__(interval)
        self.roots = roots
        self.shares = shares or {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.cores = machine_ticks()[1]
        with open("/proc/uptime") as f:
            self._born_before = float(f.read().split()[0]) * TICKS  # started earlier: count from here
        self._trees: dict[tuple[str, int], tuple[int, int]] = {}  # (group, root): (first, last) ticks
        self._parts: dict[tuple[str, int], tuple[int, int]] = {}  # (share, pid): (first, last) ticks

    def _first(self, start: int, ticks: int) -> int:
        return ticks if start < self._born_before else 0

    def sample(self) -> None:
        values: dict[str, float] = {}
        for name, pids in self.roots().items():
            for root in pids:
                tree, ticks, start = descendants(root), 0, None
                # Parents are read before their children: a child reaped between the two
                # readings is missed in this sample, never counted twice.
                for pid in tree:
                    stat = _stat(pid)
                    if stat is None:
                        continue
                    ticks += stat[0] + stat[1]
                    start = stat[2] if pid == root else start
                    for share, (group, picks) in self.shares.items():
                        if group == name and picks(pid):
                            first = self._parts.get((share, pid), (self._first(stat[2], stat[0]), 0))[0]
                            self._parts[(share, pid)] = (first, stat[0])
                key = (name, root)
                if start is not None:
                    first, last = self._trees.get(key, (self._first(start, ticks), 0))
                    self._trees[key] = (first, max(last, ticks))
        for (name, _), (first, last) in self._trees.items():
            values[name] = values.get(name, 0.0) + max(0, last - first) / TICKS
        for share in self.shares:
            values[share] = 0.0
        for (share, _), (first, last) in self._parts.items():
            values[share] += max(0, last - first) / TICKS
        values["machine"] = machine_ticks()[0] / TICKS
        self.samples.append((time.time(), values))

    def at(self, moment: float) -> dict[str, float]:
        """Every reading at ``moment``, interpolated between the samples around it (the
        first or last sample outside them)."""
        if not self.samples:
            return {}
        after = next((i for i, (t, _) in enumerate(self.samples) if t >= moment), len(self.samples) - 1)
        before = max(0, after - 1) if self.samples[after][0] > moment else after
        (t0, v0), (t1, v1) = self.samples[before], self.samples[after]
        share = min(1.0, max(0.0, (moment - t0) / (t1 - t0))) if t1 > t0 else 1.0
        return {k: v0.get(k, 0.0) + share * (v1[k] - v0.get(k, 0.0)) for k in v1}

    def usage(self, start: float, end: float, delivered: int) -> dict[str, Any]:
        """CPU per delivered email in the window ``start``-``end`` (seconds since the epoch):
        ms for each group, each share, their groups' sum (``components``) and the whole
        machine; and how many cores were busy on average, of how many."""
        first, last = self.at(start), self.at(end)
        used = {k: max(0.0, last[k] - first.get(k, 0.0)) for k in last}
        used["components"] = sum(v for k, v in used.items() if k != "machine" and k not in self.shares)
        wall = end - start
        return {
            "cpu_ms_per_email": {k: round(1000 * v / delivered, 3) for k, v in used.items()} if delivered else None,
            "cpu_seconds": {k: round(v, 3) for k, v in used.items()},
            "cores_busy": round(used["machine"] / wall, 2) if wall > 0 and "machine" in used else None,
            "cores": self.cores,
        }
