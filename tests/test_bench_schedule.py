"""``python -m project.bench.schedule`` end to end at tiny sizes: the claim timed at every
size with its baselines, scheduled notifications never early at the sink, and the run's
database and vhost gone afterwards."""

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


def test_bench_schedule_reports_the_claim_and_the_arrivals(tmp_path: Path) -> None:
    report = tmp_path / "schedule.json"
    args = ["--sizes", "2000,0", "--claims", "10", "--baseline-claims", "3", "--scheduled", "3"]
    args += ["--ahead", "3", "--stagger", "0.2", "--report", str(report)]
    done = subprocess.run(
        [sys.executable, "-m", "project.bench.schedule", *args],
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE="project.settings"),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())

    claims = result["claims"]
    assert [c["size"] for c in claims] == [0, 2000]
    for c in claims:
        assert c["outbox"] == {"due": 50, "scheduled": c["size"]}
        for shape in ("shipped", "no_index", "old"):
            assert c[shape]["rows"] == 50, shape  # every due row, none of the scheduled ones
            assert c[shape]["executions"] == (10 if shape == "shipped" else 3)
            assert 0 < c[shape]["statement_p50_ms"] <= c[shape]["statement_p99_ms"]
            assert c[shape]["explain"]["shared_hit"] > 0
        # Each priority due, then undated (rows of earlier releases): the batch is not full after any.
        assert c["shipped"]["explain"]["statements"] == 4
        dropped = {"notifications_outbox_due", "notifications_outbox_pending"}
        assert not dropped & set(c["no_index"]["explain"]["indexes"])
        assert "notifications_outbox_due" not in c["old"]["explain"]["indexes"]
    # With 2,000 rows scheduled the claim reads its index (with 50 rows in all, a table scan is cheaper).
    assert "notifications_outbox_due" in claims[-1]["shipped"]["explain"]["indexes"]
    assert [r["size"] for r in result["claim_verdict"]["ratios"]] == [0, 2000]
    assert result["setup"]["scheduled_waiting"] == 2000

    delivery = result["delivery"]
    assert delivery["n"] == 3 and delivery["statuses"] == ["sent"]
    assert delivery["early"] == 0 and delivery["late_ms"]["min"] >= 0
    assert delivery["late_ms"]["max"] < 5000  # on time, give or take a loaded CI machine
    assert delivery["duplicates"] == 0
    assert delivery["relay_published_ms"]["min"] >= 0  # the relay did not publish before send_at

    assert "EXPLAIN (ANALYZE, BUFFERS)" in done.stdout and "Scheduled delivery" in done.stdout
    setup = result["setup"]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [setup["database"]]).fetchone() is None
    vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60).stdout
    assert setup["vhost"] not in vhosts.split()
