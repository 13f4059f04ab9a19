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
    one): a message a worker refused after running it must not end it failed; one that
    crashed its worker every time is that retry's message, and does."""
    from notifications import deadletters

    n = notify(**notification_kwargs())
    first = claim(n, "host:1")
    assert finish(n, first.token, "released", "451 later")
    assert not deadletters.fail(_payload(n), "dead-lettered: refused")
    assert SentEmail.objects.get(key=n.key).state == "released"
    assert deadletters.fail(_payload(n), "dead-lettered: crashed", crashed=True)
    assert SentEmail.objects.get(key=n.key).state == "failed"


def test_a_claim_transaction_left_open_does_not_stop_a_live_holders_renewals():
    """Review: ``ON CONFLICT DO UPDATE ... WHERE`` locked a live claim until the claiming
    transaction ended, so a claimer paused or cut off in the middle of it stopped every
    renewal of the live holder, whose leases then lapsed while it was alive and sending."""
    import threading

    n, other = notify(**notification_kwargs()), notify(**notification_kwargs())
    first = claim(n, "host:1")
    started, done = threading.Event(), threading.Event()

    def stuck_claimer() -> None:
        from django.db import connections, transaction

        try:
            with transaction.atomic():
                assert SentEmail.objects.claim_many([(n.key, n.pk)], "host:2", 60, "default")[n.key].outcome == "busy"
                started.set()
                done.wait(30)  # paused, or cut off, before its commit
        finally:
            connections.close_all()

    thread = threading.Thread(target=stuck_claimer)
    thread.start()
    try:
        assert started.wait(10)
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '3s'")  # a wait for the lock fails the test
            try:
                renewed, lost = SentEmail.objects.renew([(n.key, first.token)], 60, "default")
            finally:
                cursor.execute("SET statement_timeout = 0")
        assert (renewed, lost) == ({n.key}, set())
    finally:
        done.set()
        thread.join()
    del other


def test_renewal_skips_a_row_locked_right_now_without_calling_it_lost():
    import threading

    n = notify(**notification_kwargs())
    first = claim(n, "host:1")
    locked, done = threading.Event(), threading.Event()

    def locker() -> None:
        from django.db import connections, transaction

        try:
            with transaction.atomic():
                list(SentEmail.objects.select_for_update().filter(key=n.key))
                locked.set()
                done.wait(30)
        finally:
            connections.close_all()

    thread = threading.Thread(target=locker)
    thread.start()
    try:
        assert locked.wait(10)
        assert SentEmail.objects.renew([(n.key, first.token)], 60, "default") == (set(), set())
    finally:
        done.set()
        thread.join()
    assert SentEmail.objects.renew([(n.key, first.token)], 60, "default") == ({n.key}, set())
    assert SentEmail.objects.renew([(n.key, first.token + 1)], 60, "default") == (set(), {n.key})


def test_a_hold_is_released_only_by_the_claim_that_took_it():
    """Review: a task that found a key claimed released it by key, so the holder's lease
    was no longer renewed while it sent."""
    from notifications.leases import holder

    holder.hold({"k": 1}, sent_at=__import__("time").monotonic())
    try:
        holder.release([("k", 2)])
        assert holder.remaining("k", 1) > 0
        holder.release([("k", 1)])
        assert holder.remaining("k", 1) == 0
    finally:
        holder.release([("k", 1)])
