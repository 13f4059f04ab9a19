"""``manage.py bench --brokers rabbitmq,kafka`` end to end on a tiny N: our pipeline is
measured on both delivery brokers in the one run, every email reaches the sink once on
each, both legs are in the table and the report, and the run's database, vhost and
Kafka broker are gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from project import kafkabroker
from tests.conftest import ROOT, child_env

# The session's teardown ends stray sessions in the test database, which needs one.
pytestmark = pytest.mark.django_db

N = 200


def test_bench_measures_our_pipeline_on_both_brokers(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    cmd = [sys.executable, "manage.py", "bench", "--only", "ours", "--brokers", "rabbitmq,kafka"]
    cmd += ["--n", str(N), "--paced-seconds", "2", "--report", str(report)]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE="project.settings", BENCH_WORKDIR=str(tmp_path / "logs")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    setup, run = result["setup"], result["runs"][0]

    assert setup["brokers"] == ["rabbitmq", "kafka"] and setup["kafka_partitions"] >= 12
    assert list(run) == ["ours", "ours_kafka", "wall_seconds"]  # run 1: in the order given
    rabbit, kafka = run["ours"], run["ours_kafka"]
    assert rabbit["broker"] == "rabbitmq" and kafka["broker"] == "kafka"
    assert rabbit["notify_caller"]["n"] == N and "notify_caller" not in kafka  # the caller alone: once
    for leg in (rabbit, kafka):
        for phase in ("e2e_single", "e2e_many", "half_rate"):
            got = leg[phase]
            assert got["delivered"] == got["n"] == (N if phase != "half_rate" else got["n"]), (leg["broker"], phase)
            assert got["missing"] == 0 and got["duplicates"] == 0, (leg["broker"], phase)
            assert got["delivered_per_second"] > 0 and got["latency_ms"]["p99"] is not None
            # CPU per delivered email, per component, over the phase's end-to-end window.
            cpu = got["cpu_ms_per_email"]
            assert all(v >= 0 for v in cpu.values()), (leg["broker"], phase, cpu)
            assert cpu["worker"] > 0 and cpu["caller"] > 0 and cpu["postgresql"] > 0 and cpu["sink"] > 0, cpu
            assert {"beat", "rabbitmq", "redis", "postgresql_other_databases"} <= set(cpu), cpu
            assert ("kafka" in cpu) == (leg["broker"] == "kafka"), cpu
            assert cpu["machine"] > cpu["worker"], cpu
            assert cpu["components"] <= 1.2 * cpu["machine"] + 0.5, cpu  # nothing counted twice
            assert 0 < got["cores_busy"] <= got["cores"] + 0.1  # /proc/stat counts in ticks
        # Beat's relay published every row of the phase, in passes it counted.
        relay = leg["e2e_single"]["relay"]
        assert relay["rows"] == N and relay["passes"] >= 1 and relay["ms_per_pass"] > 0, relay
        assert leg["worker_peak_rss_mib"] > 0

    assert "Kafka (Tansu)" in done.stdout and "ours, by delivery broker" in done.stdout
    assert "CPU per delivered email (ms)" in done.stdout and "Kafka broker (Tansu)" in done.stdout
    assert f"cores busy, of {rabbit['e2e_single']['cores']}" in done.stdout
    assert not kafkabroker.answers(setup["kafka_bootstrap"], timeout=1.0)
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [setup["database"]]).fetchone() is None
    vhosts = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60).stdout
    assert setup["vhost"] not in vhosts.split()
