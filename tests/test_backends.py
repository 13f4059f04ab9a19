"""Named email backends: each notification goes through the backend it names, over that
backend's own connections and no more of them than it allows; a backend a worker does
not know costs no attempt until it is configured; providers get the key as an
idempotency key where they read one; a malformed ``NOTIFICATIONS_BACKENDS`` is refused
at start-up."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from notifications import InvalidNotification, mail, notify, notify_many
from notifications.checks import check_backends
from notifications.delivery import deliver_many
from notifications.models import Notification, OutboxMessage
from notifications.relay import relay_batch
from tests import http_backend, smtp
from tests.conftest import free_port, notification_kwargs, take_delivery_payloads, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SMTP = "django.core.mail.backends.smtp.EmailBackend"


@pytest.fixture(scope="module")
def bulk_server() -> Iterator[smtp.SMTPServer]:
    """A second SMTP server, for the "bulk" backend."""
    server = smtp.start(free_port())
    yield server
    server.stop()


def two_backends(transactional: int, bulk: int, **bulk_extra: Any) -> dict[str, Any]:
    return {
        "transactional": {
            "BACKEND": SMTP,
            "OPTIONS": {"host": "127.0.0.1", "port": transactional, "timeout": 1.5},
            "IDEMPOTENCY_HEADER": "Resend-Idempotency-Key",
        },
        "bulk": {"BACKEND": SMTP, "OPTIONS": {"host": "127.0.0.1", "port": bulk, "timeout": 1.5}, **bulk_extra},
    }


def _status(key: str, **fields: Any) -> Notification:
    return wait_for(
        lambda: Notification.objects.filter(key=key, **fields).first(),
        timeout=30,
        what=lambda: list(Notification.objects.filter(key=key).values("status", "attempts", "last_error")),
    )


def test_each_notification_goes_through_the_backend_it_names(settings, smtp_server, bulk_server, workers):
    backends = two_backends(smtp_server.port, bulk_server.port)
    settings.NOTIFICATIONS_BACKENDS = backends
    default = notify(**notification_kwargs())
    digest = notify(**notification_kwargs(backend="bulk"))
    assert (default.backend, digest.backend) == ("transactional", "bulk")  # stored resolved
    workers.start(concurrency=1, NOTIFICATIONS_BACKENDS=json.dumps(backends))

    [sent] = smtp_server.wait_received(default.key)
    [bulk] = bulk_server.wait_received(digest.key)
    assert smtp_server.count(digest.key) == 0 and bulk_server.count(default.key) == 0
    # The transactional backend names an idempotency header: the key, on the email.
    assert str(sent.message["Resend-Idempotency-Key"]).strip() == default.key
    assert bulk.message["Resend-Idempotency-Key"] is None
    for key in (default.key, digest.key):
        assert _status(key, status="sent").attempts == 1


def test_a_backend_not_configured_is_refused_by_notify(settings, smtp_server, bulk_server):
    settings.NOTIFICATIONS_BACKENDS = two_backends(smtp_server.port, bulk_server.port)
    for value in ("marketing", "", 3):
        with pytest.raises(InvalidNotification) as refused:
            notify(**notification_kwargs(backend=value))
        assert refused.value.field == "backend"
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


def test_a_backend_the_worker_does_not_know_waits_without_an_attempt(settings, smtp_server, bulk_server, workers):
    """The caller knows "bulk", the first worker does not: like a mail server it cannot
    reach, no attempt, the reason on the row; a worker that knows it sends it, once."""
    backends = two_backends(smtp_server.port, bulk_server.port)
    settings.NOTIFICATIONS_BACKENDS = backends
    n = notify(**notification_kwargs(backend="bulk"))
    only_transactional = {"transactional": backends["transactional"]}
    first = workers.start(concurrency=1, NOTIFICATIONS_BACKENDS=json.dumps(only_transactional))
    waiting = _status(n.key, last_error__contains="'bulk' is not in this worker's NOTIFICATIONS_BACKENDS")
    assert waiting.status != "failed" and waiting.attempts == 0
    assert bulk_server.count(n.key) == 0 and smtp_server.count(n.key) == 0
    first.stop()

    workers.start(concurrency=1, NOTIFICATIONS_BACKENDS=json.dumps(backends))
    bulk_server.wait_received(n.key, timeout=30)
    sent = _status(n.key, status="sent")
    assert sent.attempts == 1 and bulk_server.count(n.key) == 1 and smtp_server.count(n.key) == 0


def test_a_batch_keeps_to_its_backends_connection_limit(settings, smtp_server, bulk_server, workers):
    backends = two_backends(smtp_server.port, bulk_server.port, CONNECTIONS=2)
    settings.NOTIFICATIONS_BACKENDS = backends
    keys = [n.key for n in notify_many([notification_kwargs(user_id=str(i), backend="bulk") for i in range(20)])]
    workers.start(concurrency=1, NOTIFICATIONS_SEND_CONCURRENCY="4", NOTIFICATIONS_BACKENDS=json.dumps(backends))
    received = [bulk_server.wait_received(key)[0] for key in keys]
    # Two connections (one per sending lane), though the worker sends over four elsewhere.
    assert len({r.peer for r in received}) == 2
    assert all(bulk_server.count(key) == 1 for key in keys)


def _deliver_here(kwargs: dict[str, Any]) -> Notification:
    """notify(), relay and deliver in this process (no worker)."""
    n = notify(**kwargs)
    assert relay_batch() == 1
    [[payload]] = take_delivery_payloads(wait=10, limit=1)
    [outcome] = deliver_many([payload])
    assert outcome.status == "sent", outcome
    return n


def test_an_http_api_gets_the_key_as_a_request_header(settings):
    """``IDEMPOTENCY_IN = "request"``: on the HTTP request of each email (as Resend's API
    reads ``Idempotency-Key``), not among the email's headers; each email its own key over
    one kept connection; a key too long for providers goes as its digest."""
    api = http_backend.start()
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False  # no worker runs: the test relays
    settings.NOTIFICATIONS_BACKENDS = {
        "api": {
            "BACKEND": "tests.http_backend.EmailBackend",
            "OPTIONS": {"url": api.url},
            "IDEMPOTENCY_HEADER": "Idempotency-Key",
            "IDEMPOTENCY_IN": "request",
        }
    }
    mail.drop_connection()
    take_delivery_payloads()
    try:
        first = _deliver_here(notification_kwargs())
        second = _deliver_here(notification_kwargs())
        long = _deliver_here(notification_kwargs(notification_id="x" * 200, user_id="y" * 100))
    finally:
        mail.drop_connection()
        api.stop()
    assert [r.body["headers"]["X-Notification-Key"] for r in api.received] == [first.key, second.key, long.key]
    assert [r.headers.get("idempotency-key") for r in api.received] == [
        first.key,
        second.key,
        hashlib.sha256(long.key.encode()).hexdigest(),
    ]
    assert all("Idempotency-Key" not in r.body["headers"] for r in api.received)


# -- the system check -----------------------------------------------------------------------


def fired(settings: Any, backends: Any, default: Any = None) -> list[str]:
    settings.NOTIFICATIONS_BACKENDS = backends
    settings.NOTIFICATIONS_DEFAULT_BACKEND = default
    return sorted(str(e.id) for e in check_backends())


def test_well_formed_backends_pass(settings):
    assert fired(settings, None) == []
    assert fired(settings, None, "default") == []
    full = {
        "transactional": {
            "BACKEND": SMTP,
            "OPTIONS": {"host": "smtp.example.com", "port": 587, "use_tls": True},
            "RATE_LIMIT": 14,
            "CONNECTIONS": 2,
            "IDEMPOTENCY_HEADER": "Resend-Idempotency-Key",
        },
        "bulk": {"BACKEND": "tests.http_backend.EmailBackend", "RATE_LIMIT": 0.5, "IDEMPOTENCY_IN": "email"},
    }
    assert fired(settings, full, "bulk") == []


@pytest.mark.parametrize(
    ("backends", "default", "check_id"),
    [
        (["transactional"], None, "E016"),
        ({}, None, "E016"),
        ({"bulk": "smtp"}, None, "E016"),
        ({"bulk": {"BACKEND": SMTP, "RATE": 5}}, None, "E016"),
        ({"bulk": {"BACKEND": SMTP, "OPTIONS": ["host"]}}, None, "E016"),
        ({"": {"BACKEND": SMTP}}, None, "E016"),
        ({"bulk": {"BACKEND": "anymail.backends.nowhere.EmailBackend"}}, None, "E017"),
        ({"bulk": {"BACKEND": 3}}, None, "E017"),
        ({"bulk": {"BACKEND": SMTP, "RATE_LIMIT": 0}}, None, "E018"),
        ({"bulk": {"BACKEND": SMTP, "RATE_LIMIT": -5}}, None, "E018"),
        ({"bulk": {"BACKEND": SMTP, "RATE_LIMIT": "50"}}, None, "E018"),
        ({"bulk": {"BACKEND": SMTP, "RATE_LIMIT": True}}, None, "E018"),
        ({"bulk": {"BACKEND": SMTP, "CONNECTIONS": 0}}, None, "E019"),
        ({"bulk": {"BACKEND": SMTP, "CONNECTIONS": 1.5}}, None, "E019"),
        ({"bulk": {"BACKEND": SMTP}}, "transactional", "E020"),
        (None, "bulk", "E020"),
        ({"bulk": {"BACKEND": SMTP, "IDEMPOTENCY_HEADER": "Bad: header"}}, None, "E021"),
        ({"bulk": {"BACKEND": SMTP, "IDEMPOTENCY_IN": "request"}}, None, "E021"),
        ({"bulk": {"BACKEND": SMTP, "IDEMPOTENCY_HEADER": "Idempotency-Key", "IDEMPOTENCY_IN": "body"}}, None, "E021"),
    ],
)
def test_malformed_backends_are_refused(settings, backends, default, check_id):
    errors = (fired(settings, backends, default), check_backends())
    assert errors[0] == [f"notifications.{check_id}"], [f"{e.id}: {e.msg}" for e in errors[1]]
    [error] = errors[1]
    assert error.is_serious() and error.hint
    assert "NOTIFICATIONS_" in error.msg


def test_a_worker_refuses_to_start_with_malformed_backends():
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env

    bad = json.dumps({"bulk": {"BACKEND": SMTP, "RATE_LIMIT": -1}})
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-c", "1", "--without-mingle", "--without-gossip"],
        cwd=ROOT,
        env=child_env(NOTIFICATIONS_BACKENDS=bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "notifications.E018" in done.stdout + done.stderr
