"""Scheduled notifications: ``python -m project.bench.schedule`` (``make bench-schedule``).

Two measurements, on a private database, vhost, Redis db and SMTP sink (``stack.py``),
with the shipped settings:

1. **The claim stays flat with scheduled rows waiting.** The outbox holds a few due rows
   (``DUE_HIGH`` high and ``DUE_NORMAL`` normal, fewer than a relay batch, so the claim
   must also find that nothing else is due) and 0, 10,000, 100,000 and 1,000,000 rows
   scheduled for later (``INSERT ... SELECT FROM generate_series`` into the notification
   and outbox tables, then ``VACUUM ANALYZE``). At each size ``claim_pending()`` is timed
   (in a transaction that rolls back, so the outbox stays as it is), with its
   ``EXPLAIN (ANALYZE, BUFFERS)``; then, as the baseline in the same run, the same claim
   with ``notifications_outbox_due`` dropped, and the claim of earlier releases (one
   statement, ``ORDER BY id`` over the partial index on ``id`` of unpublished rows, as
   migration 0001 made it), before the shipped index is put back.
2. **A scheduled notification arrives on time.** With the scheduled rows of the largest
   size still waiting, beat (its relay loop) and one worker run on the project's
   settings; ``--scheduled`` notifications are ``notify()``-ed with ``send_at`` ``--ahead``
   seconds from now (``--stagger`` apart), and each one's arrival at the SMTP sink is
   compared with its ``send_at``: never before it, and within a second after it.

Prints one table and writes every figure as JSON (``--report``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .backlog import SqlClock, _node_line, _walk, percentile
from .stack import RUN_CONCURRENCY, Arrivals, Stack

SIZES = (0, 10_000, 100_000, 1_000_000)
DUE_HIGH, DUE_NORMAL = 5, 45  # due rows beside the scheduled ones: fewer than a relay batch
EXPLAIN_REPEAT = 20  # EXPLAIN ANALYZE runs per measure, for the server's planning and execution medians
TARGET = 1.2  # flat: the claim at every size within 20% of the claim with no scheduled rows
LATE_TARGET = 1.0  # seconds after send_at
BODY = "Hello,\n\nA reminder you asked for, about as long as a short transactional email.\n\n-- \n#"
OLD_INDEX = "notifications_outbox_pending"  # the pending index of migrations 0001-0005
SHIPPED_INDEX = "notifications_outbox_due"


@dataclass
class Options:
    sizes: tuple[int, ...] = SIZES
    claims: int = 200
    baseline_claims: int = 50
    baseline_budget: float = 20.0
    scheduled: int = 20
    ahead: float = 10.0
    stagger: float = 0.25
    keep: bool = False


# -- 1. the claim --------------------------------------------------------------------------


class Outbox:
    """The run's outbox: filled, indexed and claimed through Django's connection."""

    def __init__(self, service: str) -> None:
        from django.db import connections

        from notifications.conf import settings
        from notifications.managers import PAYLOAD_COLUMNS
        from notifications.models import Notification, OutboxMessage

        self.service = service
        self.db = str(settings.DATABASE)
        self.conn = connections[self.db]
        self.batch = int(settings.RELAY_BATCH_SIZE)
        self.notifications = Notification._meta.db_table
        self.outbox = OutboxMessage._meta.db_table
        self.columns = ", ".join(f'n."{c}"' for c in PAYLOAD_COLUMNS)
        self.scheduled = 0
        self.shipped_index = str(
            self.sql("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [SHIPPED_INDEX])[0][0]
        )

    def sql(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        from django.db import transaction

        with transaction.atomic(using=self.db):
            yield
            transaction.set_rollback(True, using=self.db)

    # -- rows

    def _insert(self, prefix: str, first: int, count: int, due: str, priority: str, status: str) -> None:
        """``count`` notifications with their outbox rows, numbered from ``first``, in one
        statement; ``due`` is the SQL of each one's due time (``i`` is its number)."""
        self.sql(
            f'WITH ins AS (INSERT INTO "{self.notifications}" '
            '("key", "service", "notification_id", "user_id", "to", "from_email", "subject", "body", '
            '"html_body", "metadata", "send_at", "priority", "status") '
            f"SELECT %s || ':{prefix}-' || i || ':u-1', %s, '{prefix}-' || i, 'u-1', 'u-1@example.com', '', "
            f"'Your reminder #' || i, %s || i, '', '{{}}'::jsonb, {due}, {priority}, '{status}' "
            "FROM generate_series(%s::bigint, %s::bigint) AS i "
            'RETURNING "id", COALESCE("send_at", now() - interval \'1 minute\') AS due, "priority") '
            f'INSERT INTO "{self.outbox}" ("notification_id", "due_at", "priority") '
            'SELECT "id", due, "priority" FROM ins ORDER BY "id"',
            [self.service, self.service, BODY, first, first + count - 1],
        )

    def prepare(self) -> None:
        """Autovacuum off on the two tables, so every size is measured as its explicit
        VACUUM ANALYZE left it, whatever the server's autovacuum happens to do."""
        for table in (self.notifications, self.outbox):
            self.sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')

    def add_due(self) -> None:
        """The due rows every claim finds: high ones first in id order, all due a minute ago."""
        self._insert(
            "due",
            1,
            DUE_HIGH + DUE_NORMAL,
            "NULL",
            f"CASE WHEN i <= {DUE_HIGH} THEN 'high' ELSE 'normal' END",
            "created",
        )

    def add_scheduled(self, count: int) -> float:
        """``count`` more rows scheduled an hour to weeks ahead (one a second, every tenth
        high), so none falls due during the run; returns the seconds it took, VACUUM
        ANALYZE included."""
        began = time.perf_counter()
        if count:
            first = self.scheduled + 1
            due = "now() + interval '1 hour' + i * interval '1 second'"
            self._insert("sched", first, count, due, "CASE WHEN i %% 10 = 0 THEN 'high' ELSE 'normal' END", "scheduled")
            self.scheduled += count
        self.vacuum()
        return time.perf_counter() - began

    def vacuum(self) -> None:
        for table in (self.notifications, self.outbox):
            self.sql(f'VACUUM ANALYZE "{table}"')

    def remove_due(self) -> None:
        """Delete the due rows (claims that roll back leave them unpublished), so the
        delivery measurement that follows sends only its own notifications."""
        ids = f'SELECT "id" FROM "{self.notifications}" WHERE "key" LIKE %s'
        pattern = f"{self.service}:due-%"
        self.sql(f'DELETE FROM "{self.outbox}" WHERE "notification_id" IN ({ids})', [pattern])
        self.sql(f'DELETE FROM "{self.notifications}" WHERE "key" LIKE %s', [pattern])
        self.vacuum()

    def counts(self) -> dict[str, int]:
        due, scheduled = self.sql(
            f'SELECT count(*) FILTER (WHERE "due_at" <= now()), count(*) FILTER (WHERE "due_at" > now()) '
            f'FROM "{self.outbox}" WHERE "published_at" IS NULL'
        )[0]
        return {"due": int(due), "scheduled": int(scheduled)}

    # -- indexes

    def use(self, shape: str) -> None:
        """Index the outbox for ``shape``: "shipped" (notifications_outbox_due), "none"
        (neither that index nor the old one) or "old" (the old index alone)."""
        self.sql(f'DROP INDEX IF EXISTS "{SHIPPED_INDEX}"')
        self.sql(f'DROP INDEX IF EXISTS "{OLD_INDEX}"')
        if shape == "shipped":
            self.sql(self.shipped_index)
        elif shape == "old":
            self.sql(f'CREATE INDEX "{OLD_INDEX}" ON "{self.outbox}" ("id") WHERE "published_at" IS NULL')
        self.sql(f'ANALYZE "{self.outbox}"')

    # -- claims

    def claim_shipped(self) -> int:
        from notifications.models import OutboxMessage

        return len(OutboxMessage.objects.claim_pending(self.batch, self.db))

    def claim_old(self) -> int:
        """The claim of earlier releases: one statement, oldest id first, due or not read
        from each row (migration 0001's index orders by id, not by due time)."""
        rows = self.sql(
            f'SELECT o."id", n."id", n."created_at", {self.columns} FROM "{self.outbox}" o '
            f'JOIN "{self.notifications}" n ON n."id" = o."notification_id" '
            'WHERE o."published_at" IS NULL AND (o."due_at" IS NULL OR o."due_at" <= now()) '
            'ORDER BY o."id" LIMIT %s FOR UPDATE OF o SKIP LOCKED',
            [self.batch],
        )
        return len(rows)

    def _once(self, claim: Callable[[], int]) -> tuple[float, float, int, list[tuple[str, Any]]]:
        """One claim, rolled back: the call's seconds, its statements' seconds, the rows
        it returned and the statements it ran (for EXPLAIN)."""
        clock = SqlClock()
        statements: list[tuple[str, Any]] = []

        def recording(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            if "FOR UPDATE" in sql:
                statements.append((sql, params))
            return clock(execute, sql, params, many, context)

        with self.rolled_back(), self.conn.execute_wrapper(recording):
            began = time.perf_counter()
            rows = claim()
            took = time.perf_counter() - began
        return took, clock.seconds.get("claim", 0.0), rows, statements

    def time_claims(self, claim: Callable[[], int], executions: int, budget: float) -> dict[str, Any]:
        """``claim`` ``executions`` times, or as many as fit in ``budget`` seconds (at least
        three): p50 / p99 of the call and of its statements. The first execution, which
        pays for planning and for what the index change before it left, is not counted."""
        _, _, rows, statements = self._once(claim)
        calls: list[float] = []
        stmts: list[float] = []
        deadline = time.monotonic() + budget
        while len(calls) < executions and (len(calls) < 3 or time.monotonic() < deadline):
            call, stmt, _, _ = self._once(claim)
            calls.append(call)
            stmts.append(stmt)
        return {
            "rows": rows,
            "executions": len(calls),
            "p50_ms": _ms(statistics.median(calls)),
            "p99_ms": _ms(percentile(calls, 99)),
            "statement_p50_ms": _ms(statistics.median(stmts)),
            "statement_p99_ms": _ms(percentile(stmts, 99)),
            "explain": self.explain(statements, repeat=min(len(calls), EXPLAIN_REPEAT)),
        }

    def explain(self, statements: list[tuple[str, Any]], repeat: int = 1) -> dict[str, Any]:
        """EXPLAIN (ANALYZE, BUFFERS) of each statement a claim ran (as it sent them),
        rolled back, ``repeat`` times: the server's planning and execution time (medians,
        summed over the statements), which the time measured around the call adds the
        round trips and the reading of the rows to; the buffers of the last one."""
        runs = []
        for _ in range(max(1, repeat)):
            plans = []
            with self.rolled_back():
                for sql, params in statements:
                    doc = self.sql(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params)[0][0]
                    plans.append((json.loads(doc) if isinstance(doc, str) else doc)[0])
            runs.append(plans)
        plans = runs[-1]
        nodes = [list(_walk(plan["Plan"])) for plan in plans]

        def median_ms(field: str) -> float:
            return round(statistics.median(sum(p.get(field, 0.0) for p in run) for run in runs), 3)

        return {
            "statements": len(plans),
            "repeat": len(runs),
            "execution_ms": median_ms("Execution Time"),
            "planning_ms": median_ms("Planning Time"),
            "shared_hit": sum(int(p["Plan"].get("Shared Hit Blocks", 0)) for p in plans),
            "shared_read": sum(int(p["Plan"].get("Shared Read Blocks", 0)) for p in plans),
            "indexes": sorted({n["Index Name"] for tree in nodes for _, n in tree if n.get("Index Name")}),
            "seq_scans": sorted(
                {n.get("Relation Name", "?") for tree in nodes for _, n in tree if n["Node Type"] == "Seq Scan"}
            ),
            "plans": [[_node_line(depth, node) for depth, node in tree] for tree in nodes],
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def measure_claims(outbox: Outbox, o: Options, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every size: the shipped claim, then the claim without its index and the old one."""
    outbox.prepare()
    outbox.add_due()
    outbox.vacuum()
    # The first use of every code path, paid for before anything is timed.
    outbox.time_claims(outbox.claim_shipped, 20, 5.0)
    results = []
    for size in sorted(set(o.sizes)):
        say(f"{size:,} scheduled rows: filling")
        fill = outbox.add_scheduled(size - outbox.scheduled)
        out: dict[str, Any] = {"size": size, "fill_seconds": round(fill, 1), "outbox": outbox.counts()}
        say(f"  {out['outbox']} unpublished rows after {fill:.1f}s; timing {o.claims} claims")
        out["shipped"] = outbox.time_claims(outbox.claim_shipped, o.claims, 3600.0)
        say(f"  shipped claim p50 {out['shipped']['p50_ms']} ms; without its index")
        outbox.use("none")
        out["no_index"] = outbox.time_claims(outbox.claim_shipped, o.baseline_claims, o.baseline_budget)
        say(f"  without its index p50 {out['no_index']['p50_ms']} ms; the old claim over the old index")
        outbox.use("old")
        out["old"] = outbox.time_claims(outbox.claim_old, o.baseline_claims, o.baseline_budget)
        say(f"  old claim p50 {out['old']['p50_ms']} ms")
        outbox.use("shipped")
        out["load_average"] = round(os.getloadavg()[0], 2)
        results.append(out)
    return results


def _server_ms(claim: dict[str, Any]) -> float:
    """The server's part of a claim: planning and execution (EXPLAIN ANALYZE medians)."""
    return float(claim["explain"]["planning_ms"] + claim["explain"]["execution_ms"])


def claim_verdict(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each size's claim over the smallest size's (the same due rows, fewer scheduled):
    its statements' p50 as the relay waits for them, and the server's planning and
    execution alone; and what the index buys at the largest size (each baseline's
    statements p50 over the shipped claim's)."""
    if not sizes:
        return {"target": TARGET, "ratios": [], "flat": None, "server_flat": None}
    ref, largest = sizes[0]["shipped"], sizes[-1]

    def ratio(value: float, reference: float) -> float | None:
        return round(value / reference, 2) if reference else None

    ratios = [
        {
            "size": s["size"],
            "statement_p50": ratio(s["shipped"]["statement_p50_ms"], ref["statement_p50_ms"]),
            "server": ratio(_server_ms(s["shipped"]), _server_ms(ref)),
        }
        for s in sizes
    ]

    def flat(key: str) -> bool | None:
        values = [r[key] for r in ratios if r[key] is not None]
        return all(v <= TARGET for v in values) if values else None

    def times(key: str) -> float | None:
        shipped = largest["shipped"]["statement_p50_ms"]
        return round(largest[key]["statement_p50_ms"] / shipped, 1) if shipped else None

    return {
        "target": TARGET,
        "reference_size": sizes[0]["size"],
        "ratios": ratios,
        "flat": flat("statement_p50"),
        "server_flat": flat("server"),
        "no_index_over_shipped": times("no_index"),
        "old_over_shipped": times("old"),
    }


# -- 2. delivery on time -------------------------------------------------------------------


def measure_delivery(stack: Stack, o: Options, say: Callable[[str], None]) -> dict[str, Any]:
    """Beat and one worker; ``o.scheduled`` notifications due ``o.ahead`` seconds out;
    each one's arrival at the sink against its ``send_at``."""
    from django.utils import timezone

    from notifications import notify
    from notifications.models import Notification, SentEmail

    service = f"bench-{stack.id}"
    stack.start_beat()
    stack.start_worker()
    say(f"beat and a worker (-c {RUN_CONCURRENCY}) running; one notification now, to warm the path")
    arrivals = Arrivals(stack)
    warm = notify(
        service=service, notification_id="warm-up", user_id="u-1", to="u-1@example.com", subject="Warm-up", body=BODY
    )
    warm_committed = time.time()
    stack.wait(lambda: arrivals.has(warm.key), 60, "the warm-up notification at the sink")
    warm_ms = round((arrivals.at[warm.key][0] - warm_committed) * 1000, 1)
    say(
        f"  warm-up delivered {warm_ms} ms after its commit; scheduling {o.scheduled} notifications "
        f"{o.ahead:g}s ahead, {o.stagger:g}s apart"
    )

    planned: dict[str, float] = {}
    for i in range(o.scheduled):
        send_at = timezone.now() + timedelta(seconds=o.ahead + i * o.stagger)
        n = notify(
            service=service,
            notification_id=f"scheduled-{i}",
            user_id="u-1",
            to="u-1@example.com",
            subject=f"Your reminder #{i}",
            body=BODY,
            send_at=send_at,
        )
        planned[n.key] = send_at.timestamp()
    last = max(planned.values())
    stack.wait(
        lambda: arrivals.has(*planned), last - time.time() + 30, "every scheduled notification at the sink", step=0.02
    )
    time.sleep(0.5)  # a second copy, if any, would arrive right behind the first
    arrivals.collect()

    rows = {n.key: n for n in Notification.objects.filter(key__in=list(planned)).only("key", "status", "published_at")}
    claims = {s.key: s for s in SentEmail.objects.filter(key__in=list(planned)).only("key", "created_at")}
    late: list[float] = []
    published: list[float] = []
    claimed: list[float] = []
    each = []
    for key, due in planned.items():
        late.append(round((arrivals.at[key][0] - due) * 1000, 1))
        if (at := rows[key].published_at) is not None:
            published.append(round((at.timestamp() - due) * 1000, 1))
        if key in claims:
            claimed.append(round((claims[key].created_at.timestamp() - due) * 1000, 1))
        each.append({"key": key, "late_ms": late[-1], "copies": len(arrivals.at[key]), "status": rows[key].status})
    return {
        "n": len(each),
        "ahead_seconds": o.ahead,
        "stagger_seconds": o.stagger,
        "worker_concurrency": RUN_CONCURRENCY,
        "warm_up_ms": warm_ms,
        "late_ms": _spread(late),
        "relay_published_ms": _spread(published),
        "worker_claimed_ms": _spread(claimed),
        "early": sum(1 for v in late if v < 0),
        "over_target": sum(1 for v in late if v > LATE_TARGET * 1000),
        "target_ms": LATE_TARGET * 1000,
        "duplicates": sum(len(arrivals.at[key]) - 1 for key in planned),
        "statuses": sorted({str(e["status"]) for e in each}),
        "each": each,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "p50": None, "max": None}
    return {"min": min(values), "p50": round(statistics.median(values), 1), "max": max(values)}


# -- the table -----------------------------------------------------------------------------


def _num(value: Any, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _claim_cells(c: dict[str, Any], call: bool) -> list[str]:
    cells = [
        f"{_num(c['statement_p50_ms'])} / {_num(c['statement_p99_ms'])} ({c['executions']})",
        f"{_num(c['explain']['planning_ms'])} + {_num(c['explain']['execution_ms'])} / "
        f"{c['explain']['shared_hit']:,} / {c['explain']['shared_read']:,}",
    ]
    if call:
        cells.insert(0, f"{_num(c['p50_ms'])} / {_num(c['p99_ms'])}, {c['rows']} rows")
    return cells


ROWS = (
    "shipped claim_pending(), call p50 / p99 ms",
    "  statements p50 / p99 ms (executions)",
    "  EXPLAIN: planning + execution ms / shared hit / read",
    "  x statements p50 / x planning + execution (a)",
    "index dropped: statements p50 / p99 ms (n)",
    "  EXPLAIN: planning + execution ms / shared hit / read",
    "old claim, ORDER BY id: statements p50 / p99 ms (n)",
    "  EXPLAIN: planning + execution ms / shared hit / read",
    "fill (INSERT ... generate_series + VACUUM ANALYZE), s",
    "load average (1 min) at the end",
)


def render(result: dict[str, Any]) -> str:
    setup, sizes, v = result["setup"], result["claims"], result["claim_verdict"]
    ratios = {r["size"]: r for r in v["ratios"]}
    header = ["scheduled rows waiting", *(f"{s['size']:,}" for s in sizes)]
    columns = [
        [
            *_claim_cells(s["shipped"], call=True),
            f"{_num(ratios[s['size']]['statement_p50'])}x / {_num(ratios[s['size']]['server'])}x",
            *_claim_cells(s["no_index"], call=False),
            *_claim_cells(s["old"], call=False),
            _num(s["fill_seconds"], 1),
            _num(s["load_average"]),
        ]
        for s in sizes
    ]
    rows = [header, *([label, *(col[i] for col in columns)] for i, label in enumerate(ROWS))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"The relay's claim with {DUE_HIGH} high + {DUE_NORMAL} normal rows due and more scheduled for later: "
        f"batch {setup['batch']}; {setup['cpus']} CPUs, shared_buffers {setup['shared_buffers']}, PostgreSQL "
        f"{setup['postgresql']}, code {setup.get('code') or 'unknown'}",
        "",
        *(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows
        ),
        "",
        f"(a) over the same at {_num(v['reference_size'], 0)} scheduled rows. Flat within "
        f"{round((v['target'] - 1) * 100)}% up to {sizes[-1]['size']:,}: statements {_yes(v['flat'])}, "
        f"the server's planning + execution {_yes(v['server_flat'])}. "
        f"At {sizes[-1]['size']:,}: without its index {v['no_index_over_shipped']}x the shipped claim's time, "
        f"the old claim {v['old_over_shipped']}x.",
        "Each claim in a transaction that rolls back; statements timed around cursor.execute(); EXPLAIN "
        f"figures are medians of up to {EXPLAIN_REPEAT} EXPLAIN (ANALYZE, BUFFERS) runs; the first "
        "execution after each index change is not counted; baselines stop after "
        f"{setup['options']['baseline_claims']} executions or {setup['options']['baseline_budget']:g}s.",
    ]
    largest = sizes[-1]
    for label, key in (("shipped", "shipped"), ("index dropped", "no_index"), ("old claim", "old")):
        plan = largest[key]["explain"]
        lines += [
            "",
            f"EXPLAIN (ANALYZE, BUFFERS) at {largest['size']:,} scheduled rows, {label}: "
            f"indexes {', '.join(plan['indexes']) or 'none'}"
            + (f"; sequential scans on {', '.join(plan['seq_scans'])}" if plan["seq_scans"] else ""),
        ]
        for tree in plan["plans"]:
            lines += [f"  {line}" for line in tree]
    d = result["delivery"]
    late, pub, claim = d["late_ms"], d["relay_published_ms"], d["worker_claimed_ms"]
    lines += [
        "",
        f"Scheduled delivery: {d['n']} notify() with send_at {d['ahead_seconds']:g}s ahead "
        f"({d['stagger_seconds']:g}s apart), {result['setup']['scheduled_waiting']:,} other rows scheduled "
        f"for later; beat + 1 worker (-c {d['worker_concurrency']}), shipped settings:",
        f"  arrival at the SMTP sink after send_at, ms: min {_num(late['min'], 1)} / p50 {_num(late['p50'], 1)} / "
        f"max {_num(late['max'], 1)}",
        f"  of which the relay (send_at -> published): min {_num(pub['min'], 1)} / p50 {_num(pub['p50'], 1)} / "
        f"max {_num(pub['max'], 1)}; the worker's claim after send_at: p50 {_num(claim['p50'], 1)}",
        f"  early (before send_at): {d['early']}; later than {d['target_ms']:.0f} ms: {d['over_target']}; "
        f"duplicates: {d['duplicates']}; load average {d['load_average']}",
    ]
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()}))
    if not sizes or sizes[0] < 0:
        raise argparse.ArgumentTypeError("a comma-separated list of row counts, none negative")
    return sizes


def run(o: Options, say: Callable[[str], None] = print) -> dict[str, Any]:
    stack = Stack("schedule", log=say, keep=o.keep)
    began = time.monotonic()
    failed = True
    try:
        stack.setup()
        setup = stack.describe()
        outbox = Outbox(f"bench-{stack.id}")
        claims = measure_claims(outbox, o, stack.say)
        outbox.remove_due()
        setup.update(batch=outbox.batch, options=asdict(o), scheduled_waiting=outbox.counts()["scheduled"])
        delivery = measure_delivery(stack, o, stack.say)
        failed = False
    finally:
        stack.teardown(failed)
    return {
        "setup": setup,
        "claims": claims,
        "claim_verdict": claim_verdict(claims),
        "delivery": delivery,
        "wall_seconds": round(time.monotonic() - began, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.bench.schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=SIZES, help="scheduled rows, comma-separated")
    parser.add_argument("--claims", type=int, default=200, help="shipped claim executions per size")
    parser.add_argument("--baseline-claims", type=int, default=50, help="baseline executions per size (at most)")
    parser.add_argument("--baseline-budget", type=float, default=20.0, help="seconds per baseline and size")
    parser.add_argument("--scheduled", type=int, default=20, help="notifications scheduled for delivery")
    parser.add_argument("--ahead", type=float, default=10.0, help="seconds between notify() and send_at")
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between two send_at")
    parser.add_argument("--report", default="bench-schedule.json", help="where to write the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's database and vhost")
    args = parser.parse_args(argv)
    if args.claims < 1 or args.baseline_claims < 1 or args.scheduled < 1 or args.ahead <= 0:
        parser.error("--claims, --baseline-claims and --scheduled must be at least 1, --ahead positive")
    options = Options(
        sizes=args.sizes,
        claims=args.claims,
        baseline_claims=args.baseline_claims,
        baseline_budget=args.baseline_budget,
        scheduled=args.scheduled,
        ahead=args.ahead,
        stagger=args.stagger,
        keep=args.keep,
    )
    # SIGTERM ends the run like Ctrl-C: through the teardown that drops what it created.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(options)
    Path(args.report).write_text(json.dumps(result, indent=2, default=str))
    print()
    print(render(result))
    print(f"\nwhole benchmark: {result['wall_seconds']:.0f}s; report written to {args.report}")


if __name__ == "__main__":
    main()
