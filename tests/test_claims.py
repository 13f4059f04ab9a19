"""The PostgreSQL claim on its own: the unique key, the lease and the fencing token."""

from __future__ import annotations

import pytest
from django.db import connection

from notifications import notify
from notifications.models import SentEmail
from tests.conftest import notification_kwargs

pytestmark = pytest.mark.django_db(transaction=True)


def expire(key: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE notifications_sentemail SET lease_expires_at = now() - interval '1 second' WHERE key = %s", [key]
        )


def test_live_claim_is_exclusive_and_a_stale_holder_is_fenced_off():
    n = notify(**notification_kwargs())
    first = SentEmail.objects.claim(n.key, n.pk, "host:1", 60, "default")
    assert (first.outcome, first.token, first.ambiguous) == ("claimed", 1, False)
    assert SentEmail.objects.start_send(n.key, first.token, 60, n.message_id, "default")

    busy = SentEmail.objects.claim(n.key, n.pk, "host:2", 60, "default")
    assert busy.outcome == "busy" and 55 < busy.retry_in <= 61

    expire(n.key)  # the first holder is paused past its lease (SIGSTOP, a GC pause...)
    second = SentEmail.objects.claim(n.key, n.pk, "host:2", 60, "default")
    assert (second.outcome, second.token, second.ambiguous) == ("claimed", 2, True)

    # The paused holder wakes up: every write it tries is refused by the token.
    assert not SentEmail.objects.start_send(n.key, first.token, 60, n.message_id, "default")
    assert not SentEmail.objects.finish(n.key, first.token, "sent", "250 late", "default")
    assert SentEmail.objects.get(key=n.key).owner == "host:2"

    assert SentEmail.objects.finish(n.key, second.token, "sent", "250 ok", "default")
    done = SentEmail.objects.claim(n.key, n.pk, "host:3", 60, "default")
    assert (done.outcome, done.state) == ("done", "sent")
    expire(n.key)
    assert SentEmail.objects.claim(n.key, n.pk, "host:3", 60, "default").outcome == "done"  # sent is final


def test_released_claim_is_taken_over_without_ambiguity():
    n = notify(**notification_kwargs())
    first = SentEmail.objects.claim(n.key, n.pk, "host:1", 60, "default")
    SentEmail.objects.start_send(n.key, first.token, 60, n.message_id, "default")
    assert SentEmail.objects.finish(n.key, first.token, "released", "451 later", "default")
    again = SentEmail.objects.claim(n.key, n.pk, "host:2", 60, "default")
    assert (again.outcome, again.token, again.ambiguous, again.attempts) == ("claimed", 2, False, 1)
