"""Delivery in a process of its own (``notifications.sandbox``): what the Kafka consumer
uses for a replayed message, so that a crash kills that process and not the consumer."""

from __future__ import annotations

import pytest

from notifications import sandbox
from notifications.models import Notification, OutboxMessage, SentEmail
from tests.conftest import child_env, notification_kwargs

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def as_a_worker(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    """This process's environment as a worker's, which the child inherits."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    for name, value in child_env().items():
        monkeypatch.setenv(name, value)


def _payload(**overrides: str) -> dict:
    from notifications import notify

    n = notify(**notification_kwargs(**overrides))
    [row] = OutboxMessage.objects.claim_pending(10, "default")
    assert row.notification_id == n.pk
    return row.payload


def test_the_child_delivers_and_reports_the_outcome(as_a_worker: None, smtp_server) -> None:
    payload = _payload()
    [outcome] = sandbox.deliver([payload], budget=5.0)
    assert outcome.key == payload["key"] and outcome.status == "sent"
    assert smtp_server.count(payload["key"]) == 1
    assert Notification.objects.get(key=payload["key"]).status == "sent"
    assert SentEmail.objects.get(key=payload["key"]).state == "sent"


def test_a_child_that_dies_is_reported_as_a_crash_and_sends_nothing(
    as_a_worker: None, smtp_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = _payload(service="sandboxpoison")
    monkeypatch.setenv("NOTIFICATIONS_CRASH_POINTS", "before_claim=sandboxpoison:")
    with pytest.raises(sandbox.Crashed) as crashed:
        sandbox.deliver([payload], budget=5.0)
    assert crashed.value.signal == 9  # SIGKILL, as the crash point dies
    assert smtp_server.count(payload["key"]) == 0
    assert not SentEmail.objects.filter(key=payload["key"]).exists()


def test_a_child_that_cannot_start_is_a_failure_not_a_crash(
    as_a_worker: None, smtp_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: every non-zero exit counted as a crash, so a child that could not even
    start (settings it cannot import, say) used up the delivery limit of good
    notifications in seconds and ended them failed."""
    payload = _payload()
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "no.such.settings")
    with pytest.raises(sandbox.Failed, match="exited with 1"):
        sandbox.deliver([payload], budget=5.0)
    assert smtp_server.count(payload["key"]) == 0
