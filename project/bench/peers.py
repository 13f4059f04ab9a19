"""The peers, measured like our pipeline in the same run: the same N, the same number of
worker processes and concurrency, the same services and the same sink.

- plain: ``send_email.delay()`` per email, ``celery -A project.bench.peer_celery
  worker -c C`` on W processes (see ``peer_celery``);
- postoffice: ``mail.send_many()`` in batches, then its documented dispatcher,
  ``manage.py send_queued_mail --processes W*C``, run until the queue is empty.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import measure, report
from .peer_celery import QUEUE

if TYPE_CHECKING:
    from .run import BenchRun


def run_plain(bench: BenchRun, run: int) -> dict[str, Any]:
    env, n = bench.env_peer(), bench.o.n
    out: dict[str, Any] = {}
    fleet = bench.fleet(env)
    try:
        procs = bench.workers(fleet, f"plain-r{run}", "project.bench.peer_celery", QUEUE)
        bench.wait_consumers(QUEUE, procs)
        with measure.RssSampler(lambda: {p.name: p.pid for p in procs if p.alive()}) as rss:
            bench.say(f"plain: end to end, .delay() x {n} while {bench.o.workers} x {bench.o.concurrency} work")
            roles = {"worker": [p.pid for p in procs]}
            out["e2e_single"] = bench.end_to_end("plain", "single", n, f"plain-r{run}-e2e", env, fleet, lambda: roles)
        out["worker_peak_rss_mib"] = rss.peak_mib()
        out["worker_peak_pss_mib"] = rss.peak_pss_mib()
    finally:
        fleet.stop_all()
    return out


def run_postoffice(bench: BenchRun, run: int) -> dict[str, Any]:
    env, n = bench.env_peer(), bench.o.n
    out: dict[str, Any] = {}
    processes = bench.o.workers * bench.o.concurrency
    bench.sql(bench.po_database, "TRUNCATE post_office_email RESTART IDENTITY CASCADE")
    bench.sink.take()
    base = bench.sink.count
    fleet = bench.fleet(env)
    caller: list[int] = []
    # The dispatcher is post_office's delivery worker; it has no beat.
    with bench.cpu_sampler(lambda: {"worker": [p.pid for p in fleet.procs.values()], "caller": caller}) as sampler:
        bench.say(f"postoffice: send_many() x {n} in batches of {bench.o.batch}")
        calling = bench.caller("postoffice", "many", n, f"postoffice-r{run}", env)
        caller.append(calling.pid)
        calls = bench.calls(calling)
        out["send_many_caller"] = measure.caller_only(calls)
        bench.say(f"  {out['send_many_caller']['per_second']:,.0f} emails/s queued")
        bench.say(f"postoffice: send_queued_mail --processes {processes} until the queue is empty")
        dispatch_started = time.monotonic()
        lockfile = str(bench.workdir / f"post_office-r{run}")
        with measure.RssSampler(lambda: {p.name: p.pid for p in fleet.procs.values() if p.alive()}) as rss:
            # The command loops until nothing is queued; it is run again only if an email
            # was requeued for a later try (it never is against the sink).
            for attempt in range(5):
                proc = fleet.add(
                    f"postoffice-r{run}-dispatch{attempt}",
                    ["manage.py", "send_queued_mail", "--processes", str(processes), "-L", lockfile],
                )
                assert proc.popen is not None
                proc.popen.wait()
                if bench.sink.count >= base + n:
                    break
                queued = bench.sql(bench.po_database, "SELECT count(*) FROM post_office_email WHERE status IN (2, 3)")
                if not queued or not queued[0][0]:
                    break
        out["dispatch_seconds"] = round(time.monotonic() - dispatch_started, 3)
    out["dispatcher_peak_rss_mib"] = rss.peak_mib()
    out["dispatcher_peak_pss_mib"] = rss.peak_pss_mib()
    out["e2e_many"] = measure.delivery(calls, bench.sink.take(), sampler)
    bench.say(f"  postoffice-r{run}: {report.one_line(out['e2e_many'])}")
    return out
