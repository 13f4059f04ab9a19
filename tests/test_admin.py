"""The operator's admin: finding notifications, read-only outbox and sent-email records,
and the actions that send again through the outbox without ever sending a key twice."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from notifications import notify
from notifications.models import Notification, OutboxMessage, SentEmail
from tests.conftest import notification_kwargs, wait_for
from tests.smtp import Plan

CHANGELIST = "admin:notifications_notification_changelist"


def make(status: str, claim: str | None = None, **kwargs: Any) -> Notification:
    """A notification as the pipeline leaves it: published, with ``status`` and, when
    ``claim`` is given, a sent-email record in that state."""
    n = notify(**notification_kwargs(**kwargs))
    OutboxMessage.objects.filter(notification=n).update(published_at=timezone.now())
    last_error = {"failed": "550 5.1.1 No such user", "ambiguous": "held: decide in the admin"}.get(status, "")
    Notification.objects.filter(pk=n.pk).update(
        status=status, attempts=1, last_error=last_error, published_at=timezone.now()
    )
    if claim is not None:
        SentEmail.objects.create(key=n.key, notification=n, state=claim, token=1, attempts=1, response=last_error)
    return Notification.objects.get(pk=n.pk)


def shown(client: Client, **query: str) -> list[str]:
    """Keys on the notification changelist for this query, as the operator sees them."""
    response = client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200
    return sorted(n.key for n in response.context["cl"].result_list)


def act(client: Client, action: str, *selected: Notification) -> list[str]:
    """Run a changelist action on ``selected``; return the messages shown afterwards."""
    response = client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [n.pk for n in selected]},
        follow=True,
    )
    assert response.status_code == 200
    return [str(m) for m in response.context["messages"]]


def state(n: Notification) -> tuple[str, str | None, int]:
    """(notification status, sent-email state, outbox rows) for ``n``, fresh from the database."""
    claim = SentEmail.objects.filter(key=n.key).values_list("state", flat=True).first()
    return (
        Notification.objects.get(pk=n.pk).status,
        claim,
        OutboxMessage.objects.filter(notification=n).count(),
    )


# Access.


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["notification", "outboxmessage", "sentemail"])
def test_anonymous_users_are_sent_to_login(client: Client, model: str) -> None:
    url = reverse(f"admin:notifications_{model}_changelist")
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={url}"


@pytest.mark.django_db
def test_staff_without_permissions_cannot_see_notifications(client: Client, django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(reverse(CHANGELIST)).status_code == 403


# Who may run which action. Each test names the finding it guards: the actions had no
# permission check, so any staff user who could see notifications could resend a held
# ambiguous one (a possible second email), close it as sent (an email suppressed), or
# retry failed ones.

ACTIONS = ["retry_failed", "resend_ambiguous", "mark_ambiguous_sent", "cancel_selected"]


def staff(django_user_model: Any, username: str, *permissions: str) -> Any:
    """A staff user (not a superuser) holding exactly ``permissions`` (codenames of the
    notifications app)."""
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    granted = list(Permission.objects.filter(content_type__app_label="notifications", codename__in=permissions))
    assert sorted(p.codename for p in granted) == sorted(permissions)
    user.user_permissions.set(granted)
    return user


def logged_in(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.get_username(), password="pw")
    return client


def offered(client: Client) -> list[str]:
    """The actions in the changelist's action menu, as the user sees them."""
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    form = response.context["action_form"]
    return [] if form is None else [name for name, _ in form.fields["action"].choices if name]


def pending() -> tuple[Notification, Notification]:
    """A failed notification and a held ambiguous one: what the actions act on."""
    return make("failed", "failed"), make("ambiguous", "held")


def scheduled(**kwargs: Any) -> Notification:
    """A notification scheduled for an hour from now (or ``send_at``): what the cancel
    action acts on."""
    return notify(**notification_kwargs(**{"send_at": timezone.now() + timedelta(hours=1), **kwargs}))


@pytest.mark.django_db
def test_view_only_staff_sees_the_changelist_but_no_actions(django_user_model: Any) -> None:
    """Finding: admin actions had no permission check. A view-only user is offered none."""
    failed, held = pending()
    client = logged_in(staff(django_user_model, "viewer", "view_notification"))
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    page = response.content.decode()
    assert failed.key in page and held.key in page
    assert offered(client) == []
    assert 'name="action"' not in page
    for description in ("Retry failed", "Resend held ambiguous", "Mark held ambiguous", "Cancel selected"):
        assert description not in page


@pytest.mark.django_db
@pytest.mark.parametrize("action", [*ACTIONS, "delete_selected"])
@pytest.mark.parametrize("confirmed", [False, True], ids=["from-the-menu", "with-index-and-post"])
def test_view_only_staff_posting_an_action_changes_nothing(
    django_user_model: Any, action: str, confirmed: bool
) -> None:
    """Finding: admin actions had no permission check, so a view-only user could POST
    "Resend held ambiguous" (a possible second email), "Mark held ambiguous as sent" (an
    email suppressed) or "Retry failed". Now the statuses, the sent-email records and the
    outbox rows (where every email starts) stay as they were."""
    failed, held = pending()
    later = scheduled()  # what a cancel would stop
    before = [state(failed), state(held), state(later)]
    client = logged_in(staff(django_user_model, "viewer", "view_notification"))
    data: dict[str, Any] = {"action": action, "_selected_action": [failed.pk, held.pk, later.pk]}
    if confirmed:  # the other form of the request: the menu's button index, a confirmation
        data.update(index="0", post="yes")
    response = client.post(reverse(CHANGELIST), data, follow=True)
    assert response.status_code == 200
    shown_messages = [str(m) for m in response.context["messages"]]
    assert not any("queued" in m or "marked as sent" in m or "cancel" in m for m in shown_messages)
    assert [state(failed), state(held), state(later)] == before
    assert before == [("failed", "failed", 1), ("ambiguous", "held", 1), ("scheduled", None, 1)]
    assert Notification.objects.count() == 3


@pytest.mark.django_db
def test_change_permission_retries_failed_but_cannot_resolve_ambiguous(django_user_model: Any) -> None:
    """Finding: admin actions had no permission check. Retry failed needs the change
    permission; resending or closing a held ambiguous notification needs more."""
    failed, held = pending()
    later = scheduled()
    client = logged_in(staff(django_user_model, "operator", "view_notification", "change_notification"))
    assert offered(client) == ["retry_failed"]
    for action in ("resend_ambiguous", "mark_ambiguous_sent"):
        assert act(client, action, held) == ["No action selected."]
        assert state(held) == ("ambiguous", "held", 1)
    assert act(client, "cancel_selected", later) == ["No action selected."]  # a grant of its own
    assert state(later) == ("scheduled", None, 1)
    assert act(client, "retry_failed", failed, held) == ["1 failed notification(s) queued again."]
    assert state(failed) == ("created", "released", 2)
    assert state(held) == ("ambiguous", "held", 1)


@pytest.mark.django_db
def test_resolve_ambiguous_permission_resends_and_closes_held_notifications(django_user_model: Any) -> None:
    """Finding: admin actions had no permission check. The two ambiguous-resolution
    actions need notifications.resolve_ambiguous, and it is enough for them."""
    failed, held = pending()
    other = make("ambiguous", "held")
    client = logged_in(staff(django_user_model, "resolver", "view_notification", "resolve_ambiguous"))
    assert offered(client) == ["resend_ambiguous", "mark_ambiguous_sent"]
    assert act(client, "retry_failed", failed) == ["No action selected."]
    assert state(failed) == ("failed", "failed", 1)
    assert act(client, "resend_ambiguous", held) == ["1 ambiguous notification(s) queued for resending."]
    assert state(held) == ("created", "released", 2)
    assert act(client, "mark_ambiguous_sent", other) == ["1 notification(s) marked as sent."]
    assert state(other) == ("sent", "sent", 1)


@pytest.mark.django_db
def test_superuser_is_offered_every_action(admin_client: Client) -> None:
    """Finding: admin actions had no permission check. A superuser keeps all of them."""
    assert offered(admin_client) == ACTIONS


def test_the_resolve_ambiguous_permission_is_declared_on_notification() -> None:
    """Finding: admin actions had no permission check; the permission they need now exists."""
    assert ("resolve_ambiguous", "Can resend or close held ambiguous notifications") in (Notification._meta.permissions)


# Finding notifications.


@pytest.mark.django_db
def test_changelist_lists_notifications_with_their_status(admin_client: Client) -> None:
    n = make("failed", "failed")
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    page = response.content.decode()
    assert n.key in page and "ann@example.com" in page and "failed" in page


@pytest.mark.django_db
def test_filters_by_status_and_service(admin_client: Client) -> None:
    failed = make("failed", "failed", service="billing")
    sent = make("sent", "sent", service="billing")
    other = make("failed", "failed", service="shipping")
    assert shown(admin_client, status__exact="failed") == sorted([failed.key, other.key])
    assert shown(admin_client, status__exact="sent") == [sent.key]
    assert shown(admin_client, service__exact="billing") == sorted([failed.key, sent.key])
    assert shown(admin_client, status__exact="failed", service__exact="billing") == [failed.key]
    assert shown(admin_client, status__exact="ambiguous") == []


@pytest.mark.django_db
def test_search_by_key_user_id_and_address(admin_client: Client) -> None:
    ann = make("sent", "sent", user_id="user-ann-1", to="Ann Example <ann@example.com>")
    bob = make("sent", "sent", user_id="user-bob-2", to="bob@example.org")
    assert shown(admin_client, q=ann.key) == [ann.key]
    assert shown(admin_client, q=bob.notification_id) == [bob.key]  # part of a key
    assert shown(admin_client, q="user-bob-2") == [bob.key]
    assert shown(admin_client, q="ann@example.com") == [ann.key]
    assert shown(admin_client, q="example.org") == [bob.key]
    assert shown(admin_client, q="nobody@example.net") == []


@pytest.mark.django_db
def test_notification_page_shows_the_message_id_and_cannot_be_added_or_deleted(
    admin_client: Client,
) -> None:
    n = make("sent", "sent")
    page = admin_client.get(reverse("admin:notifications_notification_change", args=[n.pk]))
    assert page.status_code == 200 and escape(n.message_id) in page.content.decode()
    assert admin_client.get(reverse("admin:notifications_notification_add")).status_code == 403
    assert admin_client.get(reverse("admin:notifications_notification_delete", args=[n.pk])).status_code == 403
    assert (
        admin_client.post(reverse("admin:notifications_notification_delete", args=[n.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert Notification.objects.filter(pk=n.pk).exists()


# The outbox and the sent-email records are read-only.


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["outboxmessage", "sentemail"])
def test_records_are_read_only(admin_client: Client, model: str) -> None:
    n = make("sent", "sent")
    obj = OutboxMessage.objects.get(notification=n) if model == "outboxmessage" else SentEmail.objects.get(key=n.key)
    url = f"admin:notifications_{model}"

    changelist = admin_client.get(reverse(f"{url}_changelist"))
    assert changelist.status_code == 200
    assert n.key in changelist.content.decode()
    assert changelist.context["has_add_permission"] is False
    assert "delete_selected" not in changelist.context["cl"].model_admin.get_actions(changelist.wsgi_request)

    assert admin_client.get(reverse(f"{url}_add")).status_code == 403
    assert admin_client.post(reverse(f"{url}_add"), {}).status_code == 403
    view = admin_client.get(reverse(f"{url}_change", args=[obj.pk]))
    assert view.status_code == 200 and view.context["has_change_permission"] is False
    assert admin_client.post(reverse(f"{url}_change", args=[obj.pk]), {"state": "released"}).status_code == 403
    assert admin_client.get(reverse(f"{url}_delete", args=[obj.pk])).status_code == 403
    assert admin_client.post(reverse(f"{url}_delete", args=[obj.pk]), {"post": "yes"}).status_code == 403
    bulk = admin_client.post(
        reverse(f"{url}_changelist"),
        {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"},
    )
    assert bulk.status_code in (200, 302)
    assert type(obj).objects.filter(pk=obj.pk).exists()
    assert state(n) == ("sent", "sent", 1)


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["outboxmessage", "sentemail"])
def test_records_stay_read_only_for_staff_granted_every_permission(django_user_model: Any, model: str) -> None:
    """The outbox and the sent-email records stay read-only whatever permissions a user
    is given: add, change and delete are refused by the admin itself."""
    n = make("sent", "sent")
    obj = OutboxMessage.objects.get(notification=n) if model == "outboxmessage" else SentEmail.objects.get(key=n.key)
    codenames = [f"{verb}_{model}" for verb in ("add", "change", "delete", "view")]
    client = logged_in(staff(django_user_model, "keen", *codenames))
    url = f"admin:notifications_{model}"
    changelist = client.get(reverse(f"{url}_changelist"))
    assert changelist.status_code == 200 and n.key in changelist.content.decode()
    assert changelist.context["action_form"] is None  # not even delete_selected
    assert client.get(reverse(f"{url}_add")).status_code == 403
    assert client.post(reverse(f"{url}_change", args=[obj.pk]), {"state": "released"}).status_code == 403
    assert client.post(reverse(f"{url}_delete", args=[obj.pk]), {"post": "yes"}).status_code == 403
    client.post(
        reverse(f"{url}_changelist"), {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
    )
    assert type(obj).objects.filter(pk=obj.pk).exists()
    assert state(n) == ("sent", "sent", 1)


@pytest.mark.django_db
def test_notifications_cannot_be_added_or_deleted_even_with_those_permissions(django_user_model: Any) -> None:
    n = make("failed", "failed")
    codenames = [f"{verb}_notification" for verb in ("add", "delete", "view")]
    client = logged_in(staff(django_user_model, "keen", *codenames))
    assert offered(client) == []
    assert client.get(reverse("admin:notifications_notification_add")).status_code == 403
    assert (
        client.post(reverse("admin:notifications_notification_delete", args=[n.pk]), {"post": "yes"}).status_code == 403
    )
    assert state(n) == ("failed", "failed", 1)


@pytest.mark.django_db
def test_sent_email_search_by_key_and_message_id(admin_client: Client) -> None:
    n = make("sent", "sent")
    SentEmail.objects.filter(key=n.key).update(message_id=n.message_id)
    make("sent", "sent")
    for q in (n.key, n.message_id):
        response = admin_client.get(reverse("admin:notifications_sentemail_changelist"), {"q": q})
        assert [e.key for e in response.context["cl"].result_list] == [n.key]


# Retry failed.


@pytest.mark.django_db
def test_retry_failed_puts_a_failed_notification_back_through_the_outbox(
    admin_client: Client,
) -> None:
    n = make("failed", "failed")
    messages = act(admin_client, "retry_failed", n)
    assert messages == ["1 failed notification(s) queued again."]
    again = Notification.objects.get(pk=n.pk)
    assert (again.status, again.attempts, again.last_error) == ("created", 0, "")
    assert SentEmail.objects.get(key=n.key).state == "released"
    outbox = list(OutboxMessage.objects.filter(notification=n).order_by("id"))
    assert len(outbox) == 2
    assert outbox[0].published_at is not None and outbox[1].published_at is None


@pytest.mark.django_db
def test_retry_failed_gives_a_fresh_attempt_budget(admin_client: Client, settings: Any) -> None:
    n = make("failed", "failed")
    SentEmail.objects.filter(key=n.key).update(attempts=settings.NOTIFICATIONS_MAX_ATTEMPTS)
    act(admin_client, "retry_failed", n)
    claim = SentEmail.objects.get(key=n.key)
    assert (claim.state, claim.attempts) == ("released", 0)


@pytest.mark.django_db
def test_retry_failed_never_reopens_a_sent_email(admin_client: Client) -> None:
    # The status says failed but the record says sent (say the status write was lost):
    # the record wins, since reopening it would send the email a second time.
    n = make("failed", "sent")
    assert act(admin_client, "retry_failed", n) == ["0 failed notification(s) queued again."]
    assert state(n) == ("failed", "sent", 1)


@pytest.mark.django_db
def test_retry_failed_acts_only_on_failed_notifications(admin_client: Client) -> None:
    failed = make("failed", "failed")
    never_claimed = make("failed")
    sent = make("sent", "sent")
    in_flight = make("failed", "claimed")
    held = make("ambiguous", "held")
    messages = act(admin_client, "retry_failed", failed, never_claimed, sent, in_flight, held)
    assert messages == ["2 failed notification(s) queued again."]
    assert state(failed) == ("created", "released", 2)
    assert state(never_claimed) == ("created", None, 2)
    assert state(sent) == ("sent", "sent", 1)
    assert state(in_flight) == ("failed", "claimed", 1)
    assert state(held) == ("ambiguous", "held", 1)


# Ambiguous (held) notifications.


@pytest.mark.django_db
def test_resend_ambiguous_acts_only_on_held_ambiguous_notifications(admin_client: Client) -> None:
    held = make("ambiguous", "held")
    ambiguous_but_claimed = make("ambiguous", "claimed")
    ambiguous_but_released = make("ambiguous", "released")
    failed = make("failed", "failed")
    sent = make("sent", "sent")
    messages = act(
        admin_client,
        "resend_ambiguous",
        held,
        ambiguous_but_claimed,
        ambiguous_but_released,
        failed,
        sent,
    )
    assert messages == ["1 ambiguous notification(s) queued for resending."]
    assert state(held) == ("created", "released", 2)
    assert state(ambiguous_but_claimed) == ("ambiguous", "claimed", 1)
    assert state(ambiguous_but_released) == ("ambiguous", "released", 1)
    assert state(failed) == ("failed", "failed", 1)
    assert state(sent) == ("sent", "sent", 1)


@pytest.mark.django_db
def test_mark_ambiguous_as_sent_acts_only_on_held_ambiguous_notifications(
    admin_client: Client,
) -> None:
    held = make("ambiguous", "held")
    ambiguous_but_claimed = make("ambiguous", "claimed")
    failed_but_held = make("failed", "held")
    messages = act(admin_client, "mark_ambiguous_sent", held, ambiguous_but_claimed, failed_but_held)
    assert messages == ["1 notification(s) marked as sent."]
    assert state(held) == ("sent", "sent", 1)
    assert state(ambiguous_but_claimed) == ("ambiguous", "claimed", 1)
    assert state(failed_but_held) == ("failed", "held", 1)


# Cancel.


def test_the_cancel_permission_is_declared_on_notification() -> None:
    assert ("cancel_notification", "Can cancel notifications not yet sent") in Notification._meta.permissions


@pytest.mark.django_db
def test_cancel_stops_what_is_not_yet_sent_and_says_what_was_in_time(django_user_model: Any) -> None:
    """The cancel permission is enough for the action (and offers no other); the messages
    say how many were in time, already cancelled, stopped too late to be sure, and too
    late (with the statuses found); the rows show it."""
    from notifications import cancel

    now = timezone.now()
    later = scheduled()
    published = make("published")  # its message is on the broker, no worker took it yet
    being_sent = make("sending", "claimed")  # a live holder stamped its send: too late
    SentEmail.objects.filter(key=being_sent.key).update(
        send_started_at=now, lease_expires_at=now + timedelta(seconds=30)
    )
    unsure = make("retrying", "released")  # an earlier attempt's outcome is unknown
    SentEmail.objects.filter(key=unsure.key).update(ambiguous_count=1)
    sent = make("sent", "sent")
    failed = make("failed", "failed")
    already = scheduled()
    assert cancel(already.key).in_time

    client = logged_in(staff(django_user_model, "canceller", "view_notification", "cancel_notification"))
    assert offered(client) == ["cancel_selected"]
    assert act(client, "cancel_selected", later, published, being_sent, unsure, sent, failed, already) == [
        "2 notification(s) cancelled in time: nothing was sent, and nothing will be.",
        "1 notification(s) were cancelled already.",
        "1 notification(s) stopped too late to be sure: nothing more will be sent, but an earlier send may have "
        "reached the mail server.",
        "3 notification(s) too late to cancel, left as they are: failed 1, sending 1, sent 1.",
    ]
    # Its unpublished outbox row is gone (nothing left to publish); a published one stays.
    assert state(later) == ("cancelled", "cancelled", 0)
    assert state(published) == ("cancelled", "cancelled", 1)
    assert state(unsure) == ("cancelled", "cancelled", 1)
    assert state(already) == ("cancelled", "cancelled", 0)
    assert state(being_sent) == ("sending", "claimed", 1)
    assert state(sent) == ("sent", "sent", 1)
    assert state(failed) == ("failed", "failed", 1)
    assert Notification.objects.get(pk=later.pk).last_error == "cancelled in the admin by canceller"
    claim = SentEmail.objects.get(key=unsure.key)
    assert claim.response.endswith("an earlier send may have reached the mail server")


@pytest.mark.django_db
def test_a_cancel_in_time_fences_out_the_worker_that_claimed_it(admin_client: Client) -> None:
    """A worker claimed it but has not stamped a send: the cancel wins, under a new fencing
    token, so that worker's stamp (conditional on its token) fails and it sends nothing."""
    n = make("sending", "claimed")
    SentEmail.objects.filter(key=n.key).update(lease_expires_at=timezone.now() + timedelta(seconds=30))
    assert act(admin_client, "cancel_selected", n) == [
        "1 notification(s) cancelled in time: nothing was sent, and nothing will be."
    ]
    claim = SentEmail.objects.get(key=n.key)
    assert (claim.state, claim.token, claim.lease_expires_at) == ("cancelled", 2, None)
    assert state(n) == ("cancelled", "cancelled", 1)


@pytest.mark.django_db(transaction=True)
def test_a_notification_cancelled_after_its_message_was_published_is_never_sent(
    admin_client: Client, smtp_server: Any, workers: Any, settings: Any
) -> None:
    """The message is on the broker when the admin cancels: the worker that takes it finds
    the claim cancelled and sends nothing; the notification behind it goes out."""
    from notifications import relay
    from tests.conftest import delivery_outcomes

    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    stopped = notify(**notification_kwargs())
    assert relay.drain() == 1  # published: no worker runs yet
    assert act(admin_client, "cancel_selected", stopped) == [
        "1 notification(s) cancelled in time: nothing was sent, and nothing will be."
    ]
    behind = notify(**notification_kwargs())
    assert relay.drain() == 1
    workers.start()
    smtp_server.wait_received(behind.key)
    wait_for(
        lambda: delivery_outcomes(stopped.key) == ["cancelled"], timeout=30, what=lambda: delivery_outcomes(stopped.key)
    )
    assert smtp_server.count(stopped.key) == 0
    assert state(stopped) == ("cancelled", "cancelled", 1)
    wait_for(lambda: Notification.objects.filter(pk=behind.pk, status="sent").exists(), what="sent")


# Retry and resend leave expired and cancelled notifications alone.


@pytest.mark.django_db
def test_retry_refuses_expired_cancelled_and_past_their_expiry(admin_client: Client) -> None:
    expired = make("expired", "expired")
    cancelled = make("cancelled", "cancelled")
    too_late = make("failed", "failed", expires_at=timezone.now() + timedelta(hours=1))
    Notification.objects.filter(pk=too_late.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    failed = make("failed", "failed")
    assert act(admin_client, "retry_failed", expired, cancelled, too_late, failed) == [
        "1 expired notification(s) not retried: a send now would come after their expires_at (send a new "
        "notification if it is still wanted).",
        "1 cancelled notification(s) not retried: a cancel is a decision, not a failure (send a new notification "
        "if it was wrong).",
        "1 notification(s) not retried: their expires_at has passed, so a send now would come too late.",
        "1 failed notification(s) queued again.",
    ]
    assert state(expired) == ("expired", "expired", 1)
    assert state(cancelled) == ("cancelled", "cancelled", 1)
    assert state(too_late) == ("failed", "failed", 1)
    assert state(failed) == ("created", "released", 2)


@pytest.mark.django_db
def test_resend_refuses_a_held_notification_past_its_expiry(admin_client: Client) -> None:
    held = make("ambiguous", "held", expires_at=timezone.now() + timedelta(hours=1))
    Notification.objects.filter(pk=held.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert act(admin_client, "resend_ambiguous", held) == [
        "1 notification(s) not resent: their expires_at has passed, so a send now would come too late.",
        "0 ambiguous notification(s) queued for resending.",
    ]
    assert state(held) == ("ambiguous", "held", 1)


def test_a_requeue_never_reopens_an_expired_cancelled_or_sent_claim() -> None:
    from notifications.requeue import requeue

    for claim in ("expired", "cancelled", "sent"):
        with pytest.raises(ValueError, match="never reopens"):
            requeue(Notification.objects.none(), [claim], "created")


@pytest.mark.django_db
def test_a_retried_high_priority_notification_goes_out_high_again(admin_client: Client) -> None:
    n = make("failed", "failed", priority="high")
    assert act(admin_client, "retry_failed", n) == ["1 failed notification(s) queued again."]
    retry = OutboxMessage.objects.filter(notification=n, published_at__isnull=True).get()
    assert retry.priority == "high"


# The new fields in the list.


@pytest.mark.django_db
def test_the_list_shows_priority_backend_template_and_times_and_filters_by_priority(admin_client: Client) -> None:
    send_at = timezone.now() + timedelta(hours=2)
    expires_at = send_at + timedelta(days=1)
    high = scheduled(priority="high", expires_at=expires_at)
    Notification.objects.filter(pk=high.pk).update(send_at=send_at, template="billing/invoice", language="de")
    normal = make("sent", "sent")
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    row = page[page.index(high.key) : page.index("</tr>", page.index(high.key))]
    for shown_value in (
        "scheduled",
        "high",
        "default",
        "billing/invoice (de)",
        timezone.localtime(send_at).strftime("%Y-%m-%d %H:%M:%S"),
        timezone.localtime(expires_at).strftime("%Y-%m-%d %H:%M:%S"),
    ):
        assert shown_value in row, shown_value
    for header in ("priority", "backend", "template", "send at", "expires"):
        assert f">{header}</" in page or f">{header.capitalize()}</" in page, header
    assert shown(admin_client, priority__exact="high") == [high.key]
    assert shown(admin_client, priority__exact="normal") == [normal.key]
    assert shown(admin_client, status__exact="scheduled") == [high.key]
    detail = admin_client.get(reverse("admin:notifications_notification_change", args=[high.pk])).content.decode()
    for label in ("Template", "Language", "Send at", "Expires at", "Priority", "Backend"):
        assert label in detail, label


@pytest.mark.django_db
def test_the_backend_filter_offers_the_configured_backends_when_there_are_several(
    admin_client: Client, settings: Any
) -> None:
    assert "?backend=" not in admin_client.get(reverse(CHANGELIST)).content.decode()  # one backend: no filter
    settings.NOTIFICATIONS_BACKENDS = {
        "default": {"BACKEND": settings.EMAIL_BACKEND},
        "bulk": {"BACKEND": settings.EMAIL_BACKEND},
    }
    default = make("sent", "sent")
    bulk = make("sent", "sent", backend="bulk")
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "?backend=default" in page and "?backend=bulk" in page
    assert shown(admin_client, backend="bulk") == [bulk.key]
    assert shown(admin_client, backend="default") == [default.key]


@pytest.mark.django_db
def test_sent_email_records_filter_by_the_new_claim_states(admin_client: Client) -> None:
    expired = make("expired", "expired")
    cancelled = make("cancelled", "cancelled")
    url = reverse("admin:notifications_sentemail_changelist")
    for n, value in ((expired, "expired"), (cancelled, "cancelled")):
        response = admin_client.get(url, {"state__exact": value})
        assert [e.key for e in response.context["cl"].result_list] == [n.key]


# The actions with a real worker and mail server.


@pytest.mark.django_db(transaction=True)
def test_retry_after_retries_ran_out_delivers_once(admin_client: Client, smtp_server: Any, workers: Any) -> None:
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="421 4.7.0 Try again later", times=-1))
    n = notify(**kwargs)
    wait_for(
        lambda: Notification.objects.filter(key=key, status="failed").exists(),
        timeout=40,
        what="failed",
    )
    assert "gave up after 4 attempts" in Notification.objects.get(pk=n.pk).last_error

    with smtp_server.handler.lock:  # the mail server recovers
        smtp_server.handler.plans[key].clear()
    assert act(admin_client, "retry_failed", n) == ["1 failed notification(s) queued again."]
    sent = wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), timeout=30, what="sent")
    assert sent.attempts == 1 and smtp_server.count(key) == 1

    # Selecting it again does nothing: it is sent, and stays sent once. (Its outbox rows:
    # the first, one per retry the worker scheduled, and the admin's.)
    before = state(sent)
    assert before[:2] == ("sent", "sent") and before[2] >= 2
    assert act(admin_client, "retry_failed", sent) == ["0 failed notification(s) queued again."]
    assert state(sent) == before
    assert smtp_server.count(key) == 1


# The admin probe the chaos run calls (notifications/chaos/admin_probe.py).


@pytest.mark.django_db
def test_admin_probe_finds_that_a_view_only_user_changes_nothing(django_user_model: Any) -> None:
    """Finding: admin actions had no permission check. The probe tries every action as a
    view-only user on failed and held ambiguous notifications and sees no change."""
    from notifications.chaos.admin_probe import probe

    failed = [make("failed", "failed") for _ in range(3)]
    held = [make("ambiguous", "held") for _ in range(2)]
    later = [scheduled() for _ in range(3)]
    untouched = make("sent", "sent")
    report = probe(limit=2)
    assert report["changelist"] == 200 and report["offered"] == []
    assert report["selected"] == {"failed": 2, "ambiguous": 2, "scheduled": 2}
    assert sorted(report["actions"]) == sorted([*ACTIONS, "delete_selected"])
    assert all(a["responses"] == [200, 200] and a["changes"] == [] for a in report["actions"].values())
    assert report["changed"] is False
    assert [state(n) for n in failed] == [("failed", "failed", 1)] * 3
    assert [state(n) for n in held] == [("ambiguous", "held", 1)] * 2
    assert [state(n) for n in later] == [("scheduled", None, 1)] * 3
    assert state(untouched) == ("sent", "sent", 1)
    user = django_user_model.objects.get(username=report["user"])
    assert user.is_staff and not user.is_superuser and not user.has_usable_password()
    assert sorted(user.get_all_permissions()) == ["notifications.view_notification"]


@pytest.mark.django_db
def test_admin_probe_reuses_its_user_and_takes_back_anything_more_than_view(django_user_model: Any) -> None:
    from notifications.chaos.admin_probe import PROBE_USER, probe

    user = staff(django_user_model, PROBE_USER, "view_notification", "change_notification", "resolve_ambiguous")
    user.is_superuser = True
    user.save()
    held = make("ambiguous", "held")
    report = probe()
    assert report["offered"] == [] and report["changed"] is False
    assert state(held) == ("ambiguous", "held", 1)
    assert django_user_model.objects.filter(username=PROBE_USER).count() == 1
    again = django_user_model.objects.get(username=PROBE_USER)
    assert not again.is_superuser
    assert sorted(again.get_all_permissions()) == ["notifications.view_notification"]


@pytest.mark.django_db
def test_admin_probe_reports_what_an_unchecked_action_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: admin actions had no permission check. With the checks taken away again
    (every permission granted), the probe reports each row an action changed."""
    from notifications.admin import NotificationAdmin
    from notifications.chaos.admin_probe import probe

    monkeypatch.setattr(NotificationAdmin, "has_change_permission", lambda self, request, obj=None: True)
    monkeypatch.setattr(NotificationAdmin, "has_resolve_ambiguous_permission", lambda self, request: True)
    monkeypatch.setattr(NotificationAdmin, "has_cancel_permission", lambda self, request: True)
    failed = make("failed", "failed")
    held = make("ambiguous", "held")
    later = scheduled()
    report = probe()
    assert report["changed"] is True
    assert report["offered"] == ACTIONS
    assert report["selected"] == {"failed": 1, "ambiguous": 1, "scheduled": 1}
    # (after the retry and the resend before it queued the other two again, which it stops too)
    assert (
        f"{later.key}: status scheduled, sent-email none, 1 outbox row(s) -> "
        "status cancelled, sent-email cancelled, 0 outbox row(s)"
    ) in report["actions"]["cancel_selected"]["changes"]
    assert report["actions"]["retry_failed"]["changes"] == [
        f"{failed.key}: status failed, sent-email failed, 1 outbox row(s) -> "
        "status created, sent-email released, 2 outbox row(s)"
    ]
    assert report["actions"]["resend_ambiguous"]["changes"] == [
        f"{held.key}: status ambiguous, sent-email held, 1 outbox row(s) -> "
        "status created, sent-email released, 2 outbox row(s)"
    ]
    assert report["actions"]["delete_selected"]["changes"] == []


@pytest.mark.django_db
def test_admin_probe_never_selects_the_keys_it_is_told_to_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: the chaos run's probe selected a scheduled notification its calling service
    cancelled meanwhile, and reported the caller's cancel as a view-only user's change.
    Keys it is told to skip are never selected, so no action (even unchecked) touches them."""
    from notifications.admin import NotificationAdmin
    from notifications.chaos.admin_probe import probe
    from notifications.chaos.caller import CANCELLED_PREFIX

    monkeypatch.setattr(NotificationAdmin, "has_cancel_permission", lambda self, request: True)
    service, rest = CANCELLED_PREFIX.split(":", 1)
    theirs = scheduled(service=service, notification_id=f"{rest}7")
    ours = scheduled()
    report = probe(skip=(CANCELLED_PREFIX,))
    assert theirs.key.startswith(CANCELLED_PREFIX)
    assert report["selected"] == {"failed": 0, "ambiguous": 0, "scheduled": 1}
    assert report["actions"]["cancel_selected"]["changes"] == [
        f"{ours.key}: status scheduled, sent-email none, 1 outbox row(s) -> "
        "status cancelled, sent-email cancelled, 0 outbox row(s)"
    ]
    assert state(theirs) == ("scheduled", None, 1)


@pytest.mark.django_db(transaction=True)
def test_admin_probe_command_prints_json_for_the_database_it_is_pointed_at() -> None:
    """Finding: admin actions had no permission check. ``python -m
    notifications.chaos.admin_probe`` run against a database, as the chaos run does (the
    project's settings, no DJANGO_SECRET_KEY), prints that nothing changed."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env

    failed = make("failed", "failed")
    held = make("ambiguous", "held")
    env = child_env(DJANGO_SETTINGS_MODULE="project.settings")
    for name in ("DJANGO_SECRET_KEY", "DJANGO_DEBUG"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "notifications.chaos.admin_probe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["selected"] == {"failed": 1, "ambiguous": 1, "scheduled": 0}
    assert report["offered"] == [] and report["changed"] is False
    assert {name: a["changes"] for name, a in report["actions"].items()} == {
        name: [] for name in [*ACTIONS, "delete_selected"]
    }
    assert state(failed) == ("failed", "failed", 1)
    assert state(held) == ("ambiguous", "held", 1)


@pytest.mark.django_db
def test_a_notifications_own_page_cannot_be_saved_over_a_workers_write(admin_client):
    """Every field of a notification's page is read-only, yet saving it wrote back every
    column as it was read, over a status a worker recorded in between. The page shows,
    and saving it is refused; the changelist's actions still work (the permission is
    the changelist's)."""
    n = make("failed", claim="failed")
    page = admin_client.get(reverse("admin:notifications_notification_change", args=[n.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    Notification.objects.filter(pk=n.pk).update(status="sent")  # a worker's write meanwhile
    saved = admin_client.post(reverse("admin:notifications_notification_change", args=[n.pk]), {"_save": "Save"})
    assert saved.status_code == 403
    assert Notification.objects.get(pk=n.pk).status == "sent"
