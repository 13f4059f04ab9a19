"""``python -m project.bench.priority`` end to end on a small backlog: every high probe
reaches the sink ahead of the normal one sent with it, nothing is missing or doubled,
and the run's database and vhost are gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, child_env

# The session's teardown ends stray sessions in the test database, which needs one.
pytestmark = pytest.mark.django_db


def test_bench_priority_reports_the_probes_and_the_drain(tmp_path: Path) -> None:
    report = tmp_path / "priority.json"
    done = subprocess.run(
        [sys.executable, "-m", "project.bench.priority", "--backlog", "1000", "--probes", "2", "--report", str(report)],
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE="project.settings"),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    drain = result["drain"]

    assert drain["messages_waiting"] == 1000 // result["setup"]["delivery_batch"]  # all waiting before the worker
    assert "notifications.deliver.high" in drain["worker_queues"].split(",")
    assert drain["delivered"] == 1000 + 2 * 2 and drain["missing"] == 0 and drain["duplicates"] == 0
    assert drain["drain"]["delivered"] == 1000 and drain["drain"]["per_second"] > 0
    assert [p["k"] for p in drain["probes"]] == [0, 1]
    for p in drain["probes"]:
        for q in ("high", "normal"):
            assert p[q]["status"] == "sent", q
            assert 0 < p[q]["published_ms"] <= p[q]["worker_claim_ms"] < p[q]["latency_ms"], q
    first = drain["probes"][0]  # sent with the whole backlog still waiting
    assert first["high"]["latency_ms"] < first["normal"]["latency_ms"]

    assert "within 2000 ms" in done.stdout
    setup = result["setup"]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [setup["database"]]).fetchone() is None
    vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60).stdout
    assert setup["vhost"] not in vhosts.split()
