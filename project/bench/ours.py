"""Our pipeline's phases: the caller alone (``notify()``, then ``notify_many()``), then with
the workers and beat running, end to end for each, and the latency at half the maximum
rate. Between phases the tables are emptied, so every phase starts from the same state.

``broker="kafka"`` runs the end-to-end phases with the delivery path on Kafka (the run's
broker, topics and group of this round; Celery's own tasks stay on RabbitMQ): the caller
alone does the same work on either broker (``notify()`` never publishes), so it is
measured once, on RabbitMQ. Beat serves its counters on a port of its own, and each
phase records the relay's passes from them: how many, their rows and their seconds."""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING, Any

import psycopg

from notifications.chaos.injectors import wait
from notifications.chaos.run import free_port

from . import measure, report

if TYPE_CHECKING:
    from .run import BenchRun

TABLES = (
    "notifications_notification",
    "notifications_outboxmessage",
    "notifications_sentemail",
    "django_celery_results_taskresult",
    "notifications_streamdelivery",
)
RELAY_METRICS = (
    "notifications_relay_pass_seconds_sum",
    "notifications_relay_pass_seconds_count",
    "notifications_relay_pass_rows_sum",
    "notifications_messages_published_total",
)


def reset(bench: BenchRun) -> None:
    """Empty the pipeline's tables (waiting out a relay pass that holds a lock)."""
    tables = ", ".join(TABLES)
    for _ in range(5):
        try:
            bench.sql(bench.database, f"SET lock_timeout = '10s'; TRUNCATE {tables} RESTART IDENTITY CASCADE")
            return
        except psycopg.errors.LockNotAvailable:
            continue
    raise RuntimeError("could not truncate the pipeline's tables")


def settle(bench: BenchRun, timeout: float = 120.0) -> None:
    """Wait until every outcome is recorded, so the tables can be emptied safely."""

    def settled() -> bool:
        rows = bench.sql(
            bench.database,
            "SELECT (SELECT count(*) FROM notifications_notification "
            "WHERE status NOT IN ('sent', 'failed', 'ambiguous')) + "
            "(SELECT count(*) FROM notifications_sentemail WHERE state = 'claimed')",
        )
        return bool(rows) and rows[0][0] == 0

    if not wait(settled, timeout, 0.2):
        bench.say("  warning: outcomes still unrecorded; emptying the tables anyway")


def relay_counters(port: int) -> dict[str, float]:
    """Beat's relay counters, read from its metrics port (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in RELAY_METRICS:
            out[name] = float(value)
    return out


def relay_passes(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """What the relay did between two readings: passes, rows and messages published, and
    the mean seconds of a pass and per 1,000 rows (claim, publish with confirms, mark)."""
    if not before or not after:
        return None

    def diff(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    passes, seconds, rows = diff(RELAY_METRICS[1]), diff(RELAY_METRICS[0]), diff(RELAY_METRICS[2])
    return {
        "passes": int(passes),
        "rows": int(rows),
        "messages": int(diff(RELAY_METRICS[3])),
        "seconds": round(seconds, 3),
        "ms_per_pass": round(1000 * seconds / passes, 2) if passes else None,
        "rows_per_pass": round(rows / passes, 1) if passes else None,
        "ms_per_1000_rows": round(1e6 * seconds / rows, 1) if rows else None,
    }


def run_ours(bench: BenchRun, run: int, broker: str = "rabbitmq") -> dict[str, Any]:
    """Every phase of our pipeline for run number ``run`` on ``broker``; the results as a dict."""
    kafka = broker == "kafka"
    env, n = bench.env_ours(broker, run), bench.o.n
    label = f"ours[{broker}]"
    tag = f"ours-r{run}" if not kafka else f"ours-kafka-r{run}"
    out: dict[str, Any] = {"broker": broker}
    if not kafka:
        bench.say(f"{label}: notify() x {n} from one caller, no workers")
        out["notify_caller"] = bench.call("ours", "single", n, f"{tag}-notify", env)
        bench.say(f"  {out['notify_caller']['per_second']:,.0f} calls/s")
        bench.say(f"{label}: notify_many() x {n} in batches of {bench.o.batch}, no workers")
        out["notify_many_caller"] = bench.call("ours", "many", n, f"{tag}-notify-many", env)
        bench.say(f"  {out['notify_many_caller']['per_second']:,.0f} notifications/s")
    reset(bench)
    fleet = bench.fleet(env)
    port = free_port()
    try:
        procs = bench.workers(
            fleet, tag, "project", "notifications.deliver.high,notifications.deliver,notifications.relay"
        )
        schedule = str(bench.workdir / f"{tag}-beat-schedule")
        beat = ["-m", "celery", "-A", "project", "beat", "-l", "warning", "-s", schedule]
        relay = fleet.add(f"{tag}-beat", beat, NOTIFICATIONS_METRICS_PORT=str(port))
        roles = {"worker": [p.pid for p in procs], "beat": [relay.pid]}
        if kafka:
            roles["kafka"] = [bench.kafka.pid]
            bench.wait_kafka_consumers(env, procs)
        else:
            bench.wait_consumers("notifications.deliver", procs)

        def phase(key: str, mode: str, count: int, suffix: str, rate: float = 0.0) -> None:
            before = relay_counters(port)
            out[key] = bench.end_to_end("ours", mode, count, f"{tag}-{suffix}", env, fleet, lambda: roles, rate)
            out[key]["relay"] = relay_passes(before, relay_counters(port))
            if out[key]["relay"]:
                bench.say(f"  relay: {report.relay_line(out[key]['relay'])}")

        with measure.RssSampler(lambda: {p.name: p.pid for p in procs if p.alive()}) as rss:
            bench.say(f"{label}: end to end, notify() x {n} while {bench.o.workers} x {bench.o.concurrency} work")
            phase("e2e_single", "single", n, "e2e")
            settle(bench)
            reset(bench)
            bench.say(f"{label}: end to end, notify_many() x {n} in batches of {bench.o.batch}")
            phase("e2e_many", "many", n, "e2e-many")
            settle(bench)
            reset(bench)
            top = out["e2e_single"]["delivered_per_second"]
            if top:
                rate = top / 2
                paced = min(n, max(100, int(rate * bench.o.paced_seconds)))
                bench.say(f"{label}: latency at half the maximum rate, notify() x {paced} at {rate:,.1f}/s")
                phase("half_rate", "single", paced, "half", rate)
                out["half_rate"]["rate"] = round(rate, 1)
                settle(bench)
        out["worker_peak_rss_mib"] = rss.peak_mib()
        out["worker_peak_pss_mib"] = rss.peak_pss_mib()
    finally:
        fleet.stop_all()
    reset(bench)
    return out
