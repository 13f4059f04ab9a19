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


def _started_and_expired(n: Notification, attempts: int = 1) -> None:
    """The claim a worker leaves when it dies mid-send: send_started_at set, lease over."""
    first = claim(n, "host:1")
    assert start_send(n, first.token)
    SentEmail.objects.filter(key=n.key).update(attempts=attempts)
    expire(n.key)


def _payload(n: Notification) -> dict:
    from notifications.managers import NOTIFICATION_COLUMNS

    return {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}


def test_hold_mode_holds_an_ambiguous_takeover_even_at_the_attempt_limit(settings, smtp_server):
    """Finding 9: the attempt limit was checked before hold, so an ambiguous takeover at
    the limit ended ``failed``, and "Retry failed" could then send a second copy."""
    from notifications import delivery

    settings.NOTIFICATIONS_AMBIGUOUS = "hold"
    n = notify(**notification_kwargs())
    _started_and_expired(n, attempts=settings.NOTIFICATIONS_MAX_ATTEMPTS)
    [outcome] = delivery.deliver_many([_payload(n)])
    assert outcome.status == "held"
    record = SentEmail.objects.get(key=n.key)
    assert (record.state, record.ambiguous_count) == ("held", 1)
    assert Notification.objects.get(pk=n.pk).status == "ambiguous"
    assert smtp_server.count(n.key) == 0


@pytest.mark.parametrize(("mode", "state", "status"), [("hold", "held", "ambiguous"), ("resend", "failed", "failed")])
def test_failing_a_claim_whose_send_had_started_counts_the_ambiguity(settings, mode, state, status):
    """Finding 9: ``fail_unless_live`` (the dead-letter pass) overwrote an expired claim
    whose send had started without counting it: the email may be at the mail server. It
    is counted, and in hold mode held for a person instead of failed."""
    from notifications import deadletters

    settings.NOTIFICATIONS_AMBIGUOUS = mode
    n = notify(**notification_kwargs())
    _started_and_expired(n)
    assert deadletters.fail(_payload(n), "dead-lettered: test")
    record = SentEmail.objects.get(key=n.key)
    assert (record.state, record.ambiguous_count, record.send_started_at) == (state, 1, None)
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.status, stored.ambiguous_count) == (status, 1)
    assert "may have the email" in stored.last_error


def test_the_dead_letter_pass_leaves_a_claim_released_for_its_retry_alone():
    """A claim released for a retry has its next message on the way (or recovery gives it
    one): a dead letter of an earlier message of it must not end it failed."""
    from notifications import deadletters

    n = notify(**notification_kwargs())
    first = claim(n, "host:1")
    assert finish(n, first.token, "released", "451 later")
    assert not deadletters.fail(_payload(n), "dead-lettered: test")
    assert SentEmail.objects.get(key=n.key).state == "released"
