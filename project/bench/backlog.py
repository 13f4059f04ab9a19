"""How the relay's cost grows with the outbox backlog: ``manage.py bench_backlog``.

For each backlog size the outbox of a private database is filled with that many pending
rows (one ``INSERT ... SELECT FROM generate_series``), vacuumed and analyzed, and then:

1. the relay's claim (``claim_pending`` with the relay's batch size) is timed many times,
   each in a transaction that rolls back, so the backlog stays the same size;
2. ``relay_batch()`` publishes a fixed number of rows to a private RabbitMQ vhost where
   nothing consumes (so the broker only stores), for rows/s and the cost per row;
3. the claim is timed again: the published rows' entries in the pending index are now
   dead, and nothing has vacuumed them (autovacuum is off on the private tables), which
   is how an outbox table usually slows down.

The target is a relay whose cost per row and claim time stay flat (within 20%) from an
empty outbox to a million pending rows: the partial index on pending rows is what should
make that so, and the EXPLAIN of the claim at the largest size shows whether it is used.

Settings are read once, when a process starts, so the measuring runs in a child process
(``python -m project.bench.backlog``) whose environment points ``project.settings``
and the project's Celery app at the private database, vhost and Redis db; the parent half
(``BacklogRun``) creates them, streams the child's progress and drops them at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from notifications.chaos.injectors import add_vhost, sh
from notifications.chaos.processes import migrate

ROOT = Path(__file__).resolve().parent.parent.parent
SIZES = (0, 10_000, 100_000, 1_000_000)
TARGET = 1.2  # flat means within 20% of the reference size
# About the size of a short transactional email, like the other benchmark's.
BODY = (
    "Hello,\n\nThis is a benchmark notification about as long as a short transactional email: "
    "a greeting, two sentences and a link.\n\nhttps://example.com/notifications/settings\n\n"
    "-- \nThe notification service, #"
)


@dataclass
class Options:
    sizes: tuple[int, ...] = SIZES
    publish: int = 20_000
    claims: int = 200
    keep: bool = False


# -- the parent: private services, the child, the table ------------------------------------


class BacklogRun:
    """One run: a database, a vhost and a Redis db of its own, dropped at the end."""

    def __init__(self, options: Options, log: Callable[[str], None] = print) -> None:
        self.o = options
        self._log = log
        self.id = uuid.uuid4().hex[:6]
        self.database = f"bench_backlog_{self.id}"
        self.vhost = f"notifications-bench-backlog-{self.id}"
        self.started = time.monotonic()
        self.created: list[str] = []
        self.child: subprocess.Popen[str] | None = None

    def say(self, line: str) -> None:
        self._log(f"[{time.monotonic() - self.started:6.1f}s] {line}")

    def _admin_sql(self, sql: str) -> None:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def _pick_redis_db(self) -> int:
        # 15 is the chaos run's and `manage.py bench` takes the highest free one from 14
        # down, so starting lower keeps the two benchmarks apart when they run together.
        for db in range(13, 0, -1):
            if redis.Redis(host="127.0.0.1", port=6379, db=db).dbsize() == 0:
                return db
        raise RuntimeError("no empty Redis database among 1-13")

    def env(self) -> dict[str, str]:
        """The child's environment: this run's services only, nothing inherited that
        configures the pipeline (crash points, another run's broker or database)."""
        prefixes = ("NOTIFICATIONS_", "CELERY_", "EMAIL_", "DATABASE", "DJANGO_SETTINGS_MODULE", "REDIS_URL")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            DJANGO_SETTINGS_MODULE="project.settings",
            DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.database}",
            CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            REDIS_URL=f"redis://127.0.0.1:6379/{self.redis_db}",
            NOTIFICATIONS_LOG_LEVEL="WARNING",
        )
        return env

    def setup(self) -> None:
        self.redis_db = self._pick_redis_db()
        self.say(f"bench_backlog {self.id}: database {self.database}, vhost {self.vhost}, redis db {self.redis_db}")
        sh("redis-cli", "-n", str(self.redis_db), "flushdb")
        add_vhost(self.vhost)
        self.created.append("vhost")
        self._admin_sql(f'CREATE DATABASE "{self.database}"')
        self.created.append(self.database)
        migrate(ROOT, self.env())

    def teardown(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        if self.o.keep:
            self.say(f"kept database {self.database} and vhost {self.vhost}")
            return
        if "vhost" in self.created:
            sh("rabbitmqctl", "-q", "delete_vhost", self.vhost)
        if self.database in self.created:
            try:
                self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            except psycopg.Error as exc:
                self.say(f"could not drop {self.database}: {exc}")
        if hasattr(self, "redis_db"):
            sh("redis-cli", "-n", str(self.redis_db), "flushdb")

    def measure(self) -> dict[str, Any]:
        """Run the child to the end, passing its progress lines on; return its results."""
        with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "project.bench.backlog", "--out", str(out)]
            cmd += ["--sizes", ",".join(str(s) for s in self.o.sizes), "--publish", str(self.o.publish)]
            cmd += ["--claims", str(self.o.claims)]
            self.child = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert self.child.stdout is not None
            tail: list[str] = []
            for line in self.child.stdout:
                self.say(line.rstrip())
                tail = [*tail[-40:], line]
            if self.child.wait() != 0:
                raise RuntimeError(f"the measuring process failed:\n{''.join(tail)}")
            return dict(json.loads(out.read_text()))

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        try:
            self.setup()
            measured = self.measure()
        finally:
            self.teardown()
        return {
            "setup": {
                "id": self.id,
                "database": self.database,
                "vhost": self.vhost,
                "redis_db": self.redis_db,
                "code": _revision(),
                "cpus": os.cpu_count(),
                "options": asdict(self.o),
                **measured.pop("setup"),
            },
            **measured,
            "wall_seconds": round(time.monotonic() - began, 1),
        }


def _revision() -> str | None:
    from .report import _revision as revision

    return revision()


# -- the child: fill, claim, publish -------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class SqlClock:
    """A Django execute wrapper: the time spent in each kind of statement, so the cost of
    a relay pass splits into claiming and marking (the rest is publishing)."""

    seconds: dict[str, float] = field(default_factory=dict)
    last: tuple[str, Any] = ("", None)

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            kind = "claim" if "FOR UPDATE" in sql else "mark" if "UPDATE" in sql else "other"
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - began
            self.last = (sql, params)


class Child:
    """The measurements, in a process whose Django settings and Celery app are this run's."""

    def __init__(self, publish: int, claims: int, log: Callable[[str], None]) -> None:
        from django.db import connections

        from notifications.conf import settings
        from notifications.models import Notification, OutboxMessage

        self.publish_rows = publish
        self.claims = claims
        self.say = log
        self.db = str(settings.DATABASE)
        self.conn = connections[self.db]
        self.batch = int(settings.RELAY_BATCH_SIZE)
        self.deliver_queue = str(settings.DELIVER_QUEUE)
        self.notifications = Notification._meta.db_table
        self.outbox = OutboxMessage._meta.db_table
        self.filled = 0  # rows in the tables: a top-up's keys follow on from the backlog's

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

    # -- the backlog

    def prepare(self) -> None:
        """Autovacuum off on the two tables: the claim after publishing then sees every
        dead entry the relay left, whatever the server's autovacuum happens to do."""
        for table in (self.notifications, self.outbox):
            self.sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')

    def reset(self) -> None:
        self.sql(f'TRUNCATE "{self.notifications}", "{self.outbox}" RESTART IDENTITY CASCADE')
        self.filled = 0

    def fill(self, count: int) -> float:
        """Add ``count`` pending notifications with their outbox rows in one statement, as
        notify() writes them (the outbox rows in id order); return the seconds it took."""
        began = time.perf_counter()
        if count:
            first = self.filled + 1
            self.sql(
                f'WITH ins AS (INSERT INTO "{self.notifications}" '
                '("key", "service", "notification_id", "user_id", "to", "from_email", "subject", "body", '
                '"html_body", "metadata") '
                "SELECT 'bench:n-' || i || ':u-1', 'bench', 'n-' || i, 'u-1', 'u-1@example.com', '', "
                "'Your weekly summary #' || i, %s || i, '', '{}'::jsonb "
                'FROM generate_series(%s::bigint, %s::bigint) AS i RETURNING "id") '
                f'INSERT INTO "{self.outbox}" ("notification_id") SELECT "id" FROM ins ORDER BY "id"',
                [BODY, first, first + count - 1],
            )
            self.filled += count
        for table in (self.notifications, self.outbox):
            self.sql(f'VACUUM ANALYZE "{table}"')
        return time.perf_counter() - began

    def counts(self) -> dict[str, int]:
        pending, published = self.sql(
            'SELECT count(*) FILTER (WHERE "published_at" IS NULL), '
            f'count(*) FILTER (WHERE "published_at" IS NOT NULL) FROM "{self.outbox}"'
        )[0]
        return {"pending": int(pending), "published": int(published)}

    def table_mb(self) -> dict[str, float]:
        """Each table with its indexes, in MiB: against shared_buffers, this tells whether
        the relay's rows are read from PostgreSQL's cache or from the operating system's."""
        return {
            table: round(int(self.sql("SELECT pg_total_relation_size(%s)", [table])[0][0]) / 2**20, 1)
            for table in (self.notifications, self.outbox)
        }

    # -- the claim

    def claim_once(self, clock: SqlClock | None = None) -> tuple[float, int]:
        """One relay claim, rolled back: its seconds and how many rows it returned."""
        from notifications.models import OutboxMessage

        clock = clock or SqlClock()
        with self.rolled_back(), self.conn.execute_wrapper(clock):
            began = time.perf_counter()
            rows = OutboxMessage.objects.claim_pending(self.batch, self.db)
            return time.perf_counter() - began, len(rows)

    def time_claims(self) -> dict[str, Any]:
        """The claim ``self.claims`` times: the whole call (what the relay waits for, rows
        turned into payloads included) and its statement alone (the database's part, the
        one a backlog could slow down). The first execution is left out of the medians and
        reported apart: it pays for what the step before left behind (after publishing,
        the last batch's index entries, which it finds dead and marks killed, so the ones
        after it skip them without visiting the table)."""
        first, rows = self.claim_once()
        calls, statements = [], []
        for _ in range(self.claims):
            clock = SqlClock()
            calls.append(self.claim_once(clock)[0])
            statements.append(clock.seconds.get("claim", 0.0))
        return {
            "rows": rows,
            "executions": len(calls),
            "first_ms": _ms(first),
            "p50_ms": _ms(statistics.median(calls)),
            "p95_ms": _ms(percentile(calls, 95)),
            "statement_p50_ms": _ms(statistics.median(statements)),
            "statement_p95_ms": _ms(percentile(statements, 95)),
        }

    def explain(self) -> dict[str, Any]:
        """EXPLAIN (ANALYZE, BUFFERS) of the relay's own claim statement (taken from a
        claim as it runs, so it is whatever claim_pending sends), rolled back."""
        clock = SqlClock()
        self.claim_once(clock)
        sql, params = clock.last
        with self.rolled_back():
            got = self.sql(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params)
        doc = got[0][0]
        top = (json.loads(doc) if isinstance(doc, str) else doc)[0]
        nodes = list(_walk(top["Plan"]))
        return {
            "top_node": top["Plan"]["Node Type"],
            "indexes": sorted({n["Index Name"] for _, n in nodes if n.get("Index Name")}),
            "seq_scans": sorted({n.get("Relation Name", "?") for _, n in nodes if n["Node Type"] == "Seq Scan"}),
            "execution_ms": top.get("Execution Time"),
            "planning_ms": top.get("Planning Time"),
            "shared_hit": top["Plan"].get("Shared Hit Blocks"),
            "shared_read": top["Plan"].get("Shared Read Blocks"),
            "plan": [_node_line(depth, node) for depth, node in nodes],
        }

    # -- the relay

    def relay(self, target: int) -> dict[str, Any]:
        """relay_batch() until ``target`` rows are published: rows/s, cost per row, and
        the claim's and the mark's share of it (timed around their statements)."""
        from notifications.relay import relay_batch

        clock = SqlClock()
        published = batches = 0
        claim_ms: list[float] = []
        began = time.perf_counter()
        with self.conn.execute_wrapper(clock):
            while published < target:
                before = clock.seconds.get("claim", 0.0)
                got = relay_batch(self.db, min(self.batch, target - published))
                claim_ms.append((clock.seconds.get("claim", 0.0) - before) * 1000)
                if got == 0:
                    break
                published += got
                batches += 1
        seconds = time.perf_counter() - began
        tenth = max(1, len(claim_ms) // 10)
        return {
            "published": published,
            "batches": batches,
            "seconds": round(seconds, 3),
            "rows_per_second": round(published / seconds, 1) if published else 0.0,
            "us_per_row": round(seconds * 1e6 / published, 1) if published else None,
            "claim_us_per_row": _per_row(clock.seconds.get("claim"), published),
            "mark_us_per_row": _per_row(clock.seconds.get("mark"), published),
            "claim_ms_first_batches": round(statistics.mean(claim_ms[:tenth]), 3),
            "claim_ms_last_batches": round(statistics.mean(claim_ms[-tenth:]), 3),
        }

    def drain_queue(self) -> dict[str, int]:
        """Count and purge what the relay published (a message carries one notification or
        several, as the broker module batches them; nothing consumes, so all are there);
        purged so that every size publishes into the same empty queue."""
        from celery import current_app

        with current_app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            _, messages, consumers = channel.queue_declare(queue=self.deliver_queue, passive=True)
            channel.queue_purge(self.deliver_queue)
        return {"messages": int(messages), "consumers": int(consumers)}

    def warm_up(self) -> None:
        """One relay pass before anything is timed: the broker connection, the queue
        declarations and the first use of every code path are paid for here, not by
        whichever size comes first."""
        self.reset()
        self.fill(self.batch)
        self.relay(self.batch)
        self.drain_queue()
        self.time_claims()

    # -- one size

    def size(self, size: int) -> dict[str, Any]:
        self.reset()
        self.say(f"backlog {size:,}: filling")
        out: dict[str, Any] = {"size": size, "fill_seconds": round(self.fill(size), 2)}
        self.say(f"  filled in {out['fill_seconds']:.1f}s; timing {self.claims} claims")
        out["claim"] = self.time_claims()
        out["explain"] = self.explain()
        target = min(self.publish_rows, size)
        if size == 0:  # nothing to publish in an empty outbox: add the rows to publish
            target = self.publish_rows
            out["topped_up"] = target
            out["top_up_seconds"] = round(self.fill(target), 2)
        out["before"] = self.counts()
        out["table_mb"] = self.table_mb()
        self.say(f"  claim p50 {out['claim']['p50_ms']} ms; publishing {target:,} rows with relay_batch()")
        out["relay"] = self.relay(target)
        out["relay"].update(self.drain_queue())
        out["after"] = self.counts()
        self.say(
            f"  {out['relay']['rows_per_second']:,.0f} rows/s, {out['relay']['us_per_row']} us/row; "
            "timing the claim again"
        )
        out["claim_after"] = self.time_claims()
        out["explain_after"] = self.explain()
        out["load_average"] = round(os.getloadavg()[0], 2)
        return out

    def run(self, sizes: tuple[int, ...]) -> dict[str, Any]:
        self.prepare()
        setup = {
            "postgresql": self.sql("SHOW server_version")[0][0].split()[0],
            "server_autovacuum": self.sql("SHOW autovacuum")[0][0],
            "shared_buffers": self.sql("SHOW shared_buffers")[0][0],
            "rabbitmq": sh("rabbitmqctl", "-q", "version").stdout.strip() or None,
            "batch": self.batch,
            "publish": self.publish_rows,
            "claims": self.claims,
        }
        self.warm_up()
        results = [self.size(size) for size in sizes]
        self.reset()
        return {"setup": setup, "sizes": results, "verdict": verdict(results, self.batch)}


def _walk(node: dict[str, Any], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    yield depth, node
    for child in node.get("Plans", []):
        yield from _walk(child, depth + 1)


def _node_line(depth: int, node: dict[str, Any]) -> str:
    name = node["Node Type"]
    if node.get("Index Name"):
        name += f" using {node['Index Name']}"
    if node.get("Relation Name"):
        name += f" on {node['Relation Name']} {node.get('Alias', '')}".rstrip()
    return (
        f"{'  ' * depth}{name} (rows {node.get('Actual Rows')} x {node.get('Actual Loops')}, "
        f"{node.get('Actual Total Time')} ms, buffers hit {node.get('Shared Hit Blocks')} "
        f"read {node.get('Shared Read Blocks')})"
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _per_row(seconds: float | None, rows: int) -> float | None:
    return round(seconds * 1e6 / rows, 1) if seconds is not None and rows else None


# -- ratios and the table ------------------------------------------------------------------


def _reference(results: list[dict[str, Any]], full_claim: int = 0) -> dict[str, Any] | None:
    """The size the others are compared with: the smallest one whose claim returned at
    least ``full_claim`` rows. For claim times that is a full batch: an empty outbox's
    claim finds nothing, and costs less for that reason alone."""
    return next((r for r in results if r["claim"]["rows"] >= full_claim), None)


def _ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 2) if value and reference else None


def verdict(results: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Each size's per-row cost and claim time over the reference size's, and whether all
    stay within the target."""
    cost_ref, claim_ref = _reference(results), _reference(results, max(1, batch))
    cost = cost_ref["relay"]["us_per_row"] if cost_ref else None
    claim = claim_ref["claim"]["p50_ms"] if claim_ref else None
    ratios = [
        {
            "size": r["size"],
            "us_per_row": _ratio(r["relay"]["us_per_row"], cost),
            "claim_p50": _ratio(r["claim"]["p50_ms"], claim) if r["claim"]["rows"] else None,
            "claim_after_p50": _ratio(r["claim_after"]["p50_ms"], claim),
        }
        for r in results
    ]

    def flat(key: str) -> bool | None:
        values = [x[key] for x in ratios if x[key] is not None]
        return all(v <= TARGET for v in values) if values else None

    return {
        "target": TARGET,
        "cost_reference_size": cost_ref["size"] if cost_ref else None,
        "claim_reference_size": claim_ref["size"] if claim_ref else None,
        "ratios": ratios,
        "per_row_cost_flat": flat("us_per_row"),
        "claim_flat": flat("claim_p50"),
    }


def _num(value: Any, decimals: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{decimals}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _cells(r: dict[str, Any], x: dict[str, Any]) -> list[str]:
    """One size's column of the table, in the order of ``ROWS``."""
    c, a, rel = r["claim"], r["claim_after"], r["relay"]
    sizes = r["table_mb"].values()
    return [
        _num(r["fill_seconds"] + r.get("top_up_seconds", 0), 1),
        " + ".join(_num(mb) for mb in sizes),
        f"{_num(c['p50_ms'], 2)} / {_num(c['p95_ms'], 2)} ({_num(c['first_ms'], 2)})"
        + ("" if c["rows"] else ", 0 rows"),
        f"{_num(c['statement_p50_ms'], 2)} / {_num(c['statement_p95_ms'], 2)}",
        _x(x["claim_p50"]),
        f"{_num(r['explain']['execution_ms'], 2)} / {r['explain']['shared_hit']}",
        f"{rel['published']:,} / {rel['messages']:,}",
        _num(rel["rows_per_second"]),
        _num(rel["us_per_row"]),
        _x(x["us_per_row"]),
        f"{_num(rel['claim_us_per_row'], 1)} / {_num(rel['mark_us_per_row'], 1)}",
        f"{_num(rel['claim_ms_first_batches'], 2)} / {_num(rel['claim_ms_last_batches'], 2)}",
        f"{r['after']['pending']:,} / {r['after']['published']:,}",
        f"{_num(a['p50_ms'], 2)} / {_num(a['p95_ms'], 2)} ({_num(a['first_ms'], 2)})"
        + ("" if a["rows"] else ", 0 rows"),
        f"{_num(a['statement_p50_ms'], 2)} / {_num(a['statement_p95_ms'], 2)}",
        _x(x["claim_after_p50"]),
        f"{_num(r['explain_after']['execution_ms'], 2)} / {r['explain_after']['shared_hit']}",
        _num(r["load_average"], 2),
    ]


ROWS = (
    "fill: INSERT ... generate_series + VACUUM ANALYZE, s",
    "notification + outbox tables with indexes, MiB",
    "claim_pending(), p50 / p95 (first call) ms",
    "  its statement alone, p50 / p95 ms",
    "  x claim p50 (a)",
    "  EXPLAIN ANALYZE: execution ms / buffers hit",
    "relay_batch() until published: rows / broker messages",
    "  rows/s",
    "  us/row",
    "  x us/row (b)",
    "  claim / mark statements, us/row",
    "  claim statement, first / last 10% of batches, ms",
    "after publishing: pending / dead (published) rows",
    "  claim_pending(), p50 / p95 (first call) ms",
    "  its statement alone, p50 / p95 ms",
    "  x claim p50 (a)",
    "  EXPLAIN ANALYZE: execution ms / buffers hit",
    "load average (1 min) at the end",
)


def render(result: dict[str, Any]) -> str:
    setup, sizes, v = result["setup"], result["sizes"], result["verdict"]
    ratios = {x["size"]: x for x in v["ratios"]}
    header = ["pending rows", *(f"{r['size']:,}" + (" (*)" if r.get("topped_up") else "") for r in sizes)]
    columns = [_cells(r, ratios[r["size"]]) for r in sizes]
    rows = [header, *([label, *(col[i] for col in columns)] for i, label in enumerate(ROWS))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"Relay cost by outbox backlog: batch {setup['batch']}, {setup['claims']} claims per measure, "
        f"up to {setup['publish']:,} rows published per size; {setup['cpus']} CPUs, "
        f"shared_buffers {setup['shared_buffers']}, "
        f"code {setup.get('code') or 'unknown'}, PostgreSQL {setup['postgresql']}, RabbitMQ {setup['rabbitmq']}",
        "",
    ]
    lines += [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines += [
        "",
        f"(a) over the claim p50 at {_num(v['claim_reference_size'])} pending rows, the smallest backlog whose claim "
        f"returns a full batch; (b) over the us/row at {_num(v['cost_reference_size'])}.",
        f"Flat within {round((v['target'] - 1) * 100)}% up to {sizes[-1]['size']:,} pending rows: "
        f"relay cost per row {_yes(v['per_row_cost_flat'])}, claim {_yes(v['claim_flat'])}.",
    ]
    topped = [r for r in sizes if r.get("topped_up")]
    if topped:
        lines.append(
            f"(*) the empty outbox's claim is timed empty; then {topped[0]['topped_up']:,} rows are added "
            "(and vacuumed) so the relay has something to publish."
        )
    lines += [
        "claim: OutboxMessage.objects.claim_pending() in a transaction that rolls back, so the backlog stays as it "
        "is; relay: relay_batch() to the run's own vhost, nothing consuming; statements timed around "
        "cursor.execute(); (first call): the execution before the timed ones; after publishing: the published rows' "
        "entries in the pending index are dead, nothing vacuumed them (autovacuum is off on the run's tables).",
    ]
    largest = sizes[-1]
    for label, plan in (("before publishing", largest["explain"]), ("after publishing", largest["explain_after"])):
        scans = f"; sequential scans on {', '.join(plan['seq_scans'])}" if plan["seq_scans"] else ""
        lines += [
            "",
            f"EXPLAIN (ANALYZE, BUFFERS) of the claim at {largest['size']:,} pending rows, {label}: top node "
            f"{plan['top_node']}, index(es) {', '.join(plan['indexes']) or 'none'}{scans}; execution "
            f"{plan['execution_ms']} ms, planning {plan['planning_ms']} ms",
            *(f"  {line}" for line in plan["plan"]),
        ]
    return "\n".join(lines)


# -- the child's entry point ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The measuring half of manage.py bench_backlog.")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--publish", type=int, required=True)
    parser.add_argument("--claims", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import django

    django.setup()
    import project.celery  # noqa: F401  (relay_batch publishes through current_app: this run's broker)

    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = Child(args.publish, args.claims, log=print).run(sizes)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
