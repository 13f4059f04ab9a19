"""The PostgreSQL claim on its own: the unique key, the lease and the fencing token."""

from __future__ import annotations

import pytest
from django.db import connection

from notifications import notify
from notifications.managers import Claim, Finish, Start
from notifications.models import Notification, SentEmail
from tests.conftest import notification_kwargs

pytestmark = pytest.mark.django_db(transaction=True)


def expire(key: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE notifications_sentemail SET lease_expires_at = now() - interval '1 second' WHERE key = %s", [key]
        )


def claim(n: Notification, owner: str) -> Claim:
    return SentEmail.objects.claim_many([(n.key, n.pk)], owner, 60, "default")[n.key]


def start_send(n: Notification, token: int) -> bool:
    return SentEmail.objects.settle([], Start(n.key, token, 60, n.message_id), "default")[1]


def finish(n: Notification, token: int, state: str, response: str) -> bool:
    written, _ = SentEmail.objects.settle([Finish(n.key, token, state, response, attempts=1)], None, "default")
    return n.key in written


def test_live_claim_is_exclusive_and_a_stale_holder_is_fenced_off():
    n = notify(**notification_kwargs())
    first = claim(n, "host:1")
    assert (first.outcome, first.token, first.ambiguous) == ("claimed", 1, False)
    assert start_send(n, first.token)

    busy = claim(n, "host:2")
    assert busy.outcome == "busy" and 55 < busy.retry_in <= 61

    expire(n.key)  # the first holder is paused past its lease (SIGSTOP, a GC pause...)
    second = claim(n, "host:2")
    assert (second.outcome, second.token, second.ambiguous) == ("claimed", 2, True)

    # The paused holder wakes up: every write it tries is refused by the token.
    assert not start_send(n, first.token)
    assert not finish(n, first.token, "sent", "250 late")
    assert SentEmail.objects.get(key=n.key).owner == "host:2"

    assert finish(n, second.token, "sent", "250 ok")
    done = claim(n, "host:3")
    assert (done.outcome, done.state) == ("done", "sent")
    expire(n.key)
    assert claim(n, "host:3").outcome == "done"  # sent is final


def test_released_claim_is_taken_over_without_ambiguity():
    n = notify(**notification_kwargs())
    first = claim(n, "host:1")
    start_send(n, first.token)
    assert finish(n, first.token, "released", "451 later")
    again = claim(n, "host:2")
    assert (again.outcome, again.token, again.ambiguous, again.attempts) == ("claimed", 2, False, 1)
