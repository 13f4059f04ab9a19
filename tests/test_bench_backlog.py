"""``manage.py bench_backlog`` end to end at tiny sizes: a report with a row per size,
every row published, and the run's database and vhost gone afterwards."""

from __future__ import annotations

import json
import subprocess
from io import StringIO
from pathlib import Path

import psycopg
from django.core.management import call_command

from project.bench.backlog import percentile


def test_bench_backlog_reports_every_size(tmp_path: Path) -> None:
    report = tmp_path / "backlog.json"
    out = StringIO()
    call_command(
        "bench_backlog", "--sizes", "2000,0", "--publish", "500", "--claims", "20", "--report", str(report), stdout=out
    )
    result = json.loads(report.read_text())
    sizes = result["sizes"]

    assert [r["size"] for r in sizes] == [0, 2000]
    for r in sizes:
        assert r["relay"]["published"] == 500
        assert 0 < r["relay"]["messages"] <= 500  # in the queue, nothing consuming (a message may carry several)
        assert r["relay"]["consumers"] == 0
        assert r["relay"]["rows_per_second"] > 0
        for claim in (r["claim"], r["claim_after"]):
            assert claim["executions"] == 20
            assert 0 < claim["p50_ms"] <= claim["p95_ms"]
    empty, full = sizes
    assert empty["topped_up"] == 500 and empty["claim"]["rows"] == 0
    assert empty["after"] == {"pending": 0, "published": 500}
    assert full["claim"]["rows"] == result["setup"]["batch"]
    assert "notifications_outbox_due" in full["explain"]["indexes"]
    assert "notifications_outbox_due" in full["explain_after"]["indexes"]
    assert full["after"] == {"pending": 1500, "published": 500}
    assert result["verdict"]["claim_reference_size"] == 2000
    assert [x["size"] for x in result["verdict"]["ratios"]] == [0, 2000]
    assert result["verdict"]["ratios"][0]["us_per_row"] == 1.0

    text = out.getvalue()
    assert "x us/row" in text and "EXPLAIN (ANALYZE, BUFFERS)" in text
    setup = result["setup"]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [setup["database"]]).fetchone() is None
    vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60).stdout
    assert setup["vhost"] not in vhosts.split()


def test_percentile_is_a_measured_value() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([3.0], 95) == 3.0
