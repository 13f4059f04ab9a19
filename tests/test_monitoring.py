"""The monitoring files that ship in project/monitoring/ parse, and name only metrics the
pipeline exports; promtool checks them too where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from notifications import metrics

# No database is needed; the mark lets the suite's session fixtures, which end stray
# sessions on the test database, run when this module runs alone.
pytestmark = pytest.mark.django_db

MONITORING = Path(__file__).resolve().parent.parent / "project" / "monitoring"

# What /metrics and the workers' servers export (counters and histograms from
# metrics.py, the gauges exposition.py computes at scrape time).
GAUGES = {
    "notifications_database_up",
    "notifications_broker_up",
    "notifications_by_status",
    "notifications_outbox_backlog_rows",
    "notifications_outbox_oldest_due_age_seconds",
    "notifications_held_ambiguous",
    "notifications_stuck_claims",
    "notifications_queue_messages",
    "notifications_queue_consumers",
}


def exported() -> set[str]:
    names = set(GAUGES)
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            names.update(sample_name for sample_name in _sample_names(family.name, family.type))
    return names


def _sample_names(name: str, kind: str) -> list[str]:
    if kind == "counter":
        return [f"{name}_total"]
    if kind == "histogram":
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]


def names_in(expression: str) -> set[str]:
    return set(re.findall(r"\bnotifications_[a-z_]+\b", expression))


def test_prometheus_config_and_alert_rules_parse_and_use_exported_metrics():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"notifications-web", "notifications-worker", "notifications-beat"}
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for needed in (
        "NotificationsOutboxBacklogOld",
        "NotificationsFailureRate",
        "NotificationsAmbiguousWaiting",
        "NotificationsNoWorkerConsuming",
    ):
        assert needed in alerts
    known = exported()
    for rule in alerts.values():
        unknown = names_in(rule["expr"]) - known
        assert not unknown, (rule["alert"], unknown)


def test_grafana_provisioning_and_dashboard_parse_and_use_exported_metrics():
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = datasource["datasources"]
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/notifications.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads((MONITORING / "grafana/dashboards/notifications.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 10
    assert all(t["datasource"]["uid"] == source["uid"] for p in dashboard["panels"] for t in p["targets"])
    used = set().union(*(names_in(e) for e in expressions))
    assert not used - exported()
    for needed in (
        "notifications_deliveries_total",
        "notifications_failures_total",
        "notifications_delivery_latency_seconds_bucket",
        "notifications_outbox_oldest_due_age_seconds",
        "notifications_queue_messages",
        "notifications_relay_pass_seconds_bucket",
        "notifications_claim_takeovers_total",
        "notifications_smtp_reconnects_total",
        "notifications_dedupe_hits_total",
    ):
        assert needed in used


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules():
    result = subprocess.run(
        ["promtool", "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_prometheus_and_grafana_on_these_files_on_loopback_only():
    compose = yaml.safe_load((MONITORING.parent.parent / "docker-compose.yml").read_text())
    services = compose["services"]
    root = MONITORING.parent.parent
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (root / source).exists(), (name, source)
    assert "GF_SECURITY_ADMIN_PASSWORD" in services["grafana"]["environment"]
    assert "${GRAFANA_ADMIN_PASSWORD:?" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    for name in ("worker", "beat"):
        assert services[name]["environment"]["NOTIFICATIONS_METRICS_PORT"] == "9101"
    assert services["worker"]["environment"]["PROMETHEUS_MULTIPROC_DIR"] in services["worker"]["tmpfs"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"web:8000", "worker:9101", "beat:9101"}
