"""A high-priority notification overtakes a backlog: ``python -m project.bench.priority``
(``make bench-priority``).

On a private database, vhost, Redis db and SMTP sink (``stack.py``), with the shipped
settings and beat (its relay loop) running:

1. ``notify_many()`` queues ``--backlog`` normal notifications (batches of ``--batch``)
   and the relay publishes them all while no worker runs, so the whole backlog waits in
   ``notifications.deliver``;
2. one worker starts as ``make run`` starts it (prefork, ``-c 2`` unless ``--concurrency``
   says otherwise, consuming both delivery queues and the relay's) and drains it;
3. ``--probes`` times, spread over the drain (after 0, 1/N, 2/N ... of the backlog has
   reached the sink), one ``priority="normal"`` notification is ``notify()``-ed and right
   after it one ``priority="high"``: the high one's latency from its commit to the SMTP
   sink is the figure (target: within 2 s), the normal one's, sent into the same backlog
   at the same moment, is the baseline that shows what the high one skipped.

Each probe's latency is split where the database can tell: commit to the relay's claim
(``published_at``), from there to the worker's claim (the broker, the worker's prefetch
and its pool), and from there to the sink. The backlog's own drain rate and latency are
printed beside them. ``--report`` writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import measure
from .sink import BODY, Sink
from .stack import RUN_CONCURRENCY, Arrivals, Stack

TARGET_MS = 2000.0


@dataclass
class Options:
    backlog: int = 20_000
    probes: int = 5
    batch: int = 500
    concurrency: int = RUN_CONCURRENCY
    stall: float = 120.0
    keep: bool = False
    queues: str = ""  # the worker's -Q (empty: every pipeline queue)


def _item(service: str, name: str, i: int, priority: str = "normal") -> dict[str, Any]:
    user = f"u{i % 1000}"
    return {
        "service": service,
        "notification_id": f"{name}-{i}",
        "user_id": user,
        "to": f"{user}@example.com",
        "subject": f"Your weekly summary #{i}" if priority == "normal" else f"Your sign-in code #{i}",
        "body": BODY,
        "priority": priority,
    }


def queue_backlog(stack: Stack, o: Options, service: str) -> dict[str, float]:
    """``notify_many()`` the backlog; each key with the moment its batch committed."""
    from notifications import notify_many

    committed: dict[str, float] = {}
    for start in range(0, o.backlog, o.batch):
        items = [_item(service, "b", i) for i in range(start, min(o.backlog, start + o.batch))]
        written = notify_many(items)
        now = time.time()
        committed.update((n.key, now) for n in written)
    return committed


def wait_published(stack: Stack, timeout: float) -> float:
    """Wait until no outbox row is unpublished; return the seconds it took."""
    from notifications.models import OutboxMessage

    began = time.monotonic()
    stack.wait(
        lambda: not OutboxMessage.objects.filter(published_at__isnull=True).exists(),
        timeout,
        "every backlog row published",
        step=0.2,
    )
    return time.monotonic() - began


def probe(stack: Stack, service: str, k: int) -> dict[str, Any]:
    """One normal then one high notification, each committed on its own."""
    from notifications import notify

    out: dict[str, Any] = {"k": k}
    for priority in ("normal", "high"):
        n = notify(**_item(service, f"probe-{priority}", k, priority))
        out[priority] = {"key": n.key, "committed": time.time()}
    return out


def split(stack: Stack, entry: dict[str, Any], arrived: float | None) -> dict[str, Any]:
    """A probe's latency and where it went: to the relay's claim, to the worker's claim,
    to the sink (milliseconds from its commit)."""
    from notifications.models import Notification, SentEmail

    committed = entry["committed"]
    n = Notification.objects.filter(key=entry["key"]).only("published_at", "status", "recoveries").first()
    s = SentEmail.objects.filter(key=entry["key"]).only("created_at").first()
    published = n.published_at.timestamp() if n and n.published_at else None
    claimed = s.created_at.timestamp() if s else None

    def ms(at: float | None) -> float | None:
        return round((at - committed) * 1000, 1) if at is not None else None

    return {
        "key": entry["key"],
        "latency_ms": ms(arrived),
        "published_ms": ms(published),
        "worker_claim_ms": ms(claimed),
        "status": n.status if n else None,
    }


def _reached(sink: Sink, count: int) -> bool:
    return sink.count >= count


def measure_drain(stack: Stack, o: Options, say: Callable[[str], None]) -> dict[str, Any]:
    from notifications.conf import settings
    from notifications.models import Notification

    service = f"bench-{stack.id}"
    sink = stack.sink
    assert sink is not None
    arrivals = Arrivals(stack)
    stack.start_beat()
    say(f"beat running; notify_many() x {o.backlog:,} normal notifications in batches of {o.batch}, no worker")
    began = time.monotonic()
    committed = queue_backlog(stack, o, service)
    caller_seconds = time.monotonic() - began
    say(f"  committed in {caller_seconds:.1f}s; waiting for the relay to publish them all")
    publish_seconds = wait_published(stack, 600)
    ready, _ = stack.queue_state(str(settings.DELIVER_QUEUE)) or (0, 0)
    say(f"  all published {publish_seconds:.1f}s later: {ready:,} messages wait in {settings.DELIVER_QUEUE}")

    base = sink.count  # the sink has nothing of the run's yet: no worker has sent anything
    worker_started = time.time()
    stack.start_worker(concurrency=o.concurrency, queues=o.queues)
    consuming = time.time()
    say(
        f"worker -c {o.concurrency} consuming {consuming - worker_started:.1f}s after its start; probing "
        f"{o.probes} times over the drain"
    )
    probes = []
    for k in range(o.probes):
        target = base + o.backlog * k // o.probes
        stack.wait(partial(_reached, sink, target), o.stall, f"{target - base:,} backlog emails delivered", step=0.005)
        at = sink.count - base
        waiting = {
            name: (stack.queue_state(name) or (0, 0))[0]
            for name in (str(settings.DELIVER_QUEUE), str(settings.HIGH_QUEUE))
        }
        p = probe(stack, service, k)
        p.update(delivered_before=at, ready_messages=waiting)
        high = p["high"]["key"]
        stack.wait(partial(arrivals.has, high), 60, f"high probe {k} at the sink", step=0.005)
        first = arrivals.first(high)
        assert first is not None
        say(
            f"  probe {k}: {at:,} of {o.backlog:,} delivered, {waiting[str(settings.DELIVER_QUEUE)]:,} messages "
            f"waiting: high {(first - p['high']['committed']) * 1000:,.0f} ms commit -> SMTP"
        )
        probes.append(p)

    keys = [*committed, *(p[q]["key"] for p in probes for q in ("normal", "high"))]
    total = len(keys)
    say("waiting for the rest of the backlog and the normal probes")
    measure.wait_for_sink(lambda: sink.count - base, total, o.stall, say, "drain", stack.alive)
    time.sleep(1.0)  # a second copy of a late email would arrive right behind it
    arrivals.collect()

    for p in probes:
        for q in ("normal", "high"):
            p[q].update(split(stack, p[q], arrivals.first(p[q]["key"])))
    backlog_first = [a for k in committed if (a := arrivals.first(k)) is not None]
    latencies = [first - at for k, at in committed.items() if (first := arrivals.first(k)) is not None]
    drain = max(backlog_first) - min(backlog_first) if backlog_first else 0.0
    copies = sum(len(v) for k, v in arrivals.at.items() if k.startswith(f"{service}:"))
    recoveries = sum(Notification.objects.filter(service=service).values_list("recoveries", flat=True))
    highs = [p["high"]["latency_ms"] for p in probes]
    normals = [p["normal"]["latency_ms"] for p in probes]
    return {
        "backlog": o.backlog,
        "batch": o.batch,
        "concurrency": o.concurrency,
        "worker_queues": o.queues or stack.queues(),
        "caller_seconds": round(caller_seconds, 2),
        "publish_seconds": round(publish_seconds, 2),
        "messages_waiting": ready,
        "worker_ready_seconds": round(consuming - worker_started, 2),
        "drain": {
            "delivered": len(backlog_first),
            "seconds": round(drain, 2),
            "per_second": round(len(backlog_first) / drain, 1) if drain else None,
            "from_worker_start_seconds": round(max(backlog_first) - worker_started, 2) if backlog_first else None,
            "latency_from_commit_ms": measure.percentiles_ms(latencies),
        },
        "probes": probes,
        "high_ms": _spread(highs),
        "normal_ms": _spread(normals),
        "target_ms": TARGET_MS,
        "high_within_target": all(h is not None and h <= TARGET_MS for h in highs),
        "delivered": sum(1 for k in keys if arrivals.first(k) is not None),
        "missing": sum(1 for k in keys if arrivals.first(k) is None),
        "duplicates": copies - sum(1 for k in keys if arrivals.first(k) is not None),
        "recoveries": int(recoveries),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _spread(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"min": None, "p50": None, "max": None}
    return {"min": min(present), "p50": round(statistics.median(present), 1), "max": max(present)}


def _num(value: Any, decimals: int = 0) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def _split(p: dict[str, Any]) -> str:
    return f"{_num(p['latency_ms'])} ({_num(p['published_ms'])} / {_num(p['worker_claim_ms'])})"


def render(result: dict[str, Any]) -> str:
    s, d = result["setup"], result["drain"]
    lines = [
        f'priority="high" into a backlog of {d["backlog"]:,} normal notifications: beat + 1 worker '
        f"(prefork -c {d['concurrency']}, prefetch multiplier 1, -Q {d['worker_queues']}), shipped settings; "
        f"{s['cpus']} CPUs, code {s.get('code') or 'unknown'}, load average at the start {s['load_average'][0]}",
        f"backlog: notify_many() in {d['caller_seconds']}s, all published {d['publish_seconds']}s later "
        f"({d['messages_waiting']:,} messages waiting), worker consuming {d['worker_ready_seconds']}s after its start",
        "",
    ]
    rows = [
        [
            "probe",
            "backlog delivered",
            "messages waiting",
            "high: ms to SMTP (relay / worker claim)",
            "normal: ms to SMTP (relay / worker claim)",
        ],
    ]
    rows += [
        [
            str(p["k"]),
            f"{p['delivered_before']:,}",
            f"{p['ready_messages'][s['deliver_queue']]:,}",
            _split(p["high"]),
            _split(p["normal"]),
        ]
        for p in d["probes"]
    ]
    lines += _table(rows)
    dl = d["drain"]["latency_from_commit_ms"]
    lines += [
        "(milliseconds from the notification's commit: to the SMTP sink, to the relay's claim, to the worker's claim)",
        "",
        f"high: min {_num(d['high_ms']['min'])} / p50 {_num(d['high_ms']['p50'])} / "
        f"max {_num(d['high_ms']['max'])} ms; "
        f"within {d['target_ms']:.0f} ms: {'yes' if d['high_within_target'] else 'NO'}",
        f"normal probe (baseline): min {_num(d['normal_ms']['min'])} / p50 {_num(d['normal_ms']['p50'])} / "
        f"max {_num(d['normal_ms']['max'])} ms",
        f"the backlog: {d['drain']['delivered']:,} delivered in {d['drain']['seconds']}s = "
        f"{_num(d['drain']['per_second'])}/s; commit -> SMTP p50 / p95 / max {_num(dl['p50'])} / {_num(dl['p95'])} / "
        f"{_num(dl['max'])} ms (counted from its commit, before the worker started)",
        f"at the sink: {d['delivered']:,} delivered, {d['missing']} missing, {d['duplicates']} duplicates; "
        f"recoveries {d['recoveries']}; load average at the end {d['load_average']}",
    ]
    return "\n".join(lines)


def run(o: Options, say: Callable[[str], None] = print) -> dict[str, Any]:
    stack = Stack("priority", log=say, keep=o.keep)
    began = time.monotonic()
    failed = True
    try:
        stack.setup()
        from notifications.conf import settings

        setup = stack.describe()
        setup.update(
            options=asdict(o),
            deliver_queue=str(settings.DELIVER_QUEUE),
            high_queue=str(settings.HIGH_QUEUE),
            delivery_batch=int(settings.DELIVERY_BATCH_SIZE),
            high_batch=int(settings.HIGH_BATCH_SIZE),
            send_concurrency=int(settings.SEND_CONCURRENCY),
            relay_hold_max=float(settings.RELAY_HOLD_MAX),
        )
        drain = measure_drain(stack, o, stack.say)
        failed = False
    finally:
        stack.teardown(failed)
    return {"setup": setup, "drain": drain, "wall_seconds": round(time.monotonic() - began, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.bench.priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=20_000, help="normal notifications waiting (default 20000)")
    parser.add_argument("--probes", type=int, default=5, help="high (and normal) probes over the drain")
    parser.add_argument("--batch", type=int, default=500, help="items per notify_many() call")
    parser.add_argument("--concurrency", type=int, default=RUN_CONCURRENCY, help="the worker's pool size")
    parser.add_argument("--stall", type=float, default=120.0, help="give up after this long without progress")
    parser.add_argument("--report", default="bench-priority.json", help="where to write the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's database and vhost")
    parser.add_argument("--queues", default="", help="the worker's -Q (default: both delivery queues and the relay's)")
    args = parser.parse_args(argv)
    if min(args.backlog, args.probes, args.batch, args.concurrency) < 1:
        parser.error("--backlog, --probes, --batch and --concurrency must be at least 1")
    options = Options(args.backlog, args.probes, args.batch, args.concurrency, args.stall, args.keep, args.queues)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(options)
    Path(args.report).write_text(json.dumps(result, indent=2, default=str))
    print()
    print(render(result))
    print(f"\nwhole benchmark: {result['wall_seconds']:.0f}s; report written to {args.report}")


if __name__ == "__main__":
    main()
