"""``make bench-writes`` end to end at a tiny N: the write path's cost per email is
printed, every claim ends sent, and the updates it counts are the path's own."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, child_env


def test_bench_writes_reports_the_cost_per_email_of_every_write() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "project.bench.writes", "--n", "200", "--runs", "1"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    run = json.loads(lines[0].removeprefix("run 1: "))
    assert run["emails"] == 200
    assert run["pg_cpu_us_per_email"] > 0 and run["wal_bytes_per_email"] > 0
    # Published once, marked sending once, recorded once; the claim stamped and recorded.
    assert run["updates_per_email"] == {"notification": 3.0, "sentemail": 2.0, "outboxmessage": 1.0}
    assert set(run["hot_share"]) == set(run["index_bytes_per_email"]) == {"notification", "sentemail", "outboxmessage"}
    assert lines[-1].startswith("median of 1: PostgreSQL CPU ")
