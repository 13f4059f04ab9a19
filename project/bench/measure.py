"""What the benchmark reads while a phase runs: the sink's progress and a process tree's
resident memory from /proc (its CPU time: ``cpu``), and the numbers made of them afterwards."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from .cpu import CpuSampler

PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a worker's main process and its pool)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size: shared pages (a prefork pool shares most of its parent's)
    counted once across the tree rather than once per process, as RSS does."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds from a thread of its own, while used
    as a context manager, and once more as it ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class RssSampler(Sampler):
    """Samples, every ``interval`` seconds, the resident memory of each named process tree
    (``roots()`` is asked each time, so restarted or short-lived processes are seen)."""

    def __init__(self, roots: Callable[[], dict[str, int]], interval: float = 0.25) -> None:
        super().__init__(interval)
        self.roots = roots
        self.peak: dict[str, int] = {}
        self.peak_pss: dict[str, int] = {}

    def sample(self) -> None:
        for name, pid in self.roots().items():
            tree = descendants(pid)
            self.peak[name] = max(self.peak.get(name, 0), rss_bytes(tree))
            self.peak_pss[name] = max(self.peak_pss.get(name, 0), pss_bytes(tree))

    def peak_mib(self) -> float | None:
        """The largest tree's peak RSS (the sum over its processes), in MiB."""
        return round(max(self.peak.values()) / 2**20, 1) if self.peak else None

    def peak_pss_mib(self) -> float | None:
        return round(max(self.peak_pss.values()) / 2**20, 1) if self.peak_pss else None


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(1000 * ordered[-1], 1)}


def wait_for_sink(
    count: Callable[[], int],
    target: int,
    stall: float,
    say: Callable[[str], None],
    label: str,
    broken: Callable[[], str | None] = lambda: None,
    base: int = 0,
) -> bool:
    """Wait until ``count()`` reaches ``target``; give up after ``stall`` seconds without
    progress, and raise as soon as ``broken()`` names a reason (a process died).
    Prints a progress line every ten seconds."""
    last, last_change, last_said = count(), time.monotonic(), time.monotonic()
    while True:
        now = count()
        if now >= target:
            return True
        reason = broken()
        if reason:
            raise RuntimeError(f"{label}: {reason}")
        if now != last:
            last, last_change = now, time.monotonic()
        if time.monotonic() - last_change > stall:
            say(f"  {label}: no progress for {stall:.0f}s at {now - base}/{target - base}; giving up")
            return False
        if time.monotonic() - last_said >= 10:
            say(f"  {label}: {now - base}/{target - base} at the sink")
            last_said = time.monotonic()
        time.sleep(0.05)


def delivery(
    calls: dict[str, Any], arrivals: Sequence[tuple[str, float]], cpu: CpuSampler | None = None
) -> dict[str, Any]:
    """End-to-end numbers of one phase: ``calls`` is the caller's record (its start time,
    and each key with the moment its commit or publish returned), ``arrivals`` the sink's;
    with ``cpu``, sampled through the phase, the CPU per delivered email over the same
    window as the rate."""
    committed = dict(zip(calls["keys"], calls["committed"], strict=True))
    first: dict[str, float] = {}
    copies = 0
    for key, at in arrivals:
        if key in committed:
            copies += 1
            first.setdefault(key, at)
    last = max(first.values()) if first else calls["start"]
    seconds = last - calls["start"]
    latency = [first[k] - committed[k] for k in committed if k in first]
    usage = cpu.usage(calls["start"], last, len(first)) if cpu is not None else {}
    sink = usage.get("cpu_seconds", {}).get("sink")
    return {
        "n": len(committed),
        "delivered": len(first),
        "missing": len(committed) - len(first),
        "duplicates": copies - len(first),
        "seconds": round(seconds, 3),
        "delivered_per_second": round(len(first) / seconds, 1) if seconds > 0 else None,
        "caller_seconds": round(calls["end"] - calls["start"], 3),
        "caller_per_second": _rate(calls),
        "latency_ms": percentiles_ms(latency),
        "sink_cpu_percent": round(100 * sink / seconds, 1) if sink is not None and seconds > 0 else None,
        **usage,
    }


def _rate(calls: dict[str, Any]) -> float | None:
    seconds = calls["end"] - calls["start"]
    return round(len(calls["keys"]) / seconds, 1) if seconds > 0 else None


def caller_only(calls: dict[str, Any]) -> dict[str, Any]:
    return {
        "n": len(calls["keys"]),
        "seconds": round(calls["end"] - calls["start"], 3),
        "per_second": _rate(calls),
    }
