"""``python -m project.bench.retention`` end to end on a small table: it deletes what is
past retention while notify() and the relay's claim keep working, and drops its database."""

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


def test_bench_retention_reports_the_purge_and_the_latencies(tmp_path: Path) -> None:
    report = tmp_path / "retention.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "project.bench.retention",
            "--rows",
            "3000",
            "--baseline",
            "0.5",
            "--report",
            str(report),
        ],
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE="project.settings"),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(report.read_text())

    assert figures["deleted"] == {"notifications": 2100, "outbox": 2100, "sent": 2100}
    assert figures["skipped"] == 0 and figures["errors"] == []
    assert figures["batches"] >= 7 and figures["rows_per_second"] > 0
    for name in ("notify_before", "notify_during", "claim_before", "claim_during"):
        assert figures[name]["count"] > 0 and figures[name]["p50_ms"] <= figures[name]["max_ms"], name
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [figures["database"]]).fetchone() is None
