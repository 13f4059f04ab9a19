"""Our pipeline's phases: the caller alone (``notify()``, then ``notify_many()``), then with
the workers and beat running, end to end for each, and the latency at half the maximum
rate. Between phases the tables are emptied, so every phase starts from the same state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from notifications.chaos.injectors import wait

from . import measure

if TYPE_CHECKING:
    from .run import BenchRun

TABLES = (
    "notifications_notification",
    "notifications_outboxmessage",
    "notifications_sentemail",
    "django_celery_results_taskresult",
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


def run_ours(bench: BenchRun, run: int) -> dict[str, Any]:
    """Every phase of our pipeline for run number ``run``; the results as a dict."""
    env, n = bench.env_ours(), bench.o.n
    out: dict[str, Any] = {}
    bench.say(f"ours: notify() x {n} from one caller, no workers")
    out["notify_caller"] = bench.call("ours", "single", n, f"ours-r{run}-notify", env)
    bench.say(f"  {out['notify_caller']['per_second']:,.0f} calls/s")
    bench.say(f"ours: notify_many() x {n} in batches of {bench.o.batch}, no workers")
    out["notify_many_caller"] = bench.call("ours", "many", n, f"ours-r{run}-notify-many", env)
    bench.say(f"  {out['notify_many_caller']['per_second']:,.0f} notifications/s")
    reset(bench)
    fleet = bench.fleet(env)
    try:
        procs = bench.workers(
            fleet, f"ours-r{run}", "project", "notifications.deliver.high,notifications.deliver,notifications.relay"
        )
        schedule = str(bench.workdir / f"ours-r{run}-beat-schedule")
        fleet.add(f"ours-r{run}-beat", ["-m", "celery", "-A", "project", "beat", "-l", "warning", "-s", schedule])
        bench.wait_consumers("notifications.deliver", procs)
        with measure.RssSampler(lambda: {p.name: p.pid for p in procs if p.alive()}) as rss:
            bench.say(f"ours: end to end, notify() x {n} while {bench.o.workers} x {bench.o.concurrency} work")
            out["e2e_single"] = bench.end_to_end("ours", "single", n, f"ours-r{run}-e2e", env, fleet)
            settle(bench)
            reset(bench)
            bench.say(f"ours: end to end, notify_many() x {n} in batches of {bench.o.batch}")
            out["e2e_many"] = bench.end_to_end("ours", "many", n, f"ours-r{run}-e2e-many", env, fleet)
            settle(bench)
            reset(bench)
            top = out["e2e_single"]["delivered_per_second"]
            if top:
                rate = top / 2
                paced = min(n, max(100, int(rate * bench.o.paced_seconds)))
                bench.say(f"ours: latency at half the maximum rate, notify() x {paced} at {rate:,.1f}/s")
                out["half_rate"] = bench.end_to_end("ours", "single", paced, f"ours-r{run}-half", env, fleet, rate)
                out["half_rate"]["rate"] = round(rate, 1)
                settle(bench)
        out["worker_peak_rss_mib"] = rss.peak_mib()
        out["worker_peak_pss_mib"] = rss.peak_pss_mib()
    finally:
        fleet.stop_all()
    reset(bench)
    return out
