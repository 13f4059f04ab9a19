"""The admin probe: a view-only staff user tries every Notification admin action on the
notifications an operator would act on (``failed``, held ``ambiguous`` and ``scheduled``
ones, the last what a cancel stops) and says whether anything changed. The chaos run
calls it during traffic and fails if it did.

Run it in a process whose Django settings point at the database to probe::

    DJANGO_SETTINGS_MODULE=project.settings DATABASE_URL=postgres://... python -m notifications.chaos.admin_probe

It prints the report as JSON and exits 1 when an action changed something. Requests go
through ``django.test.Client`` to the admin in this process; no web server is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from contextlib import ExitStack
from typing import Any

PROBE_USER = "notifications-admin-probe"
LIMIT = 20

# (notification status, sent-email state or None, outbox rows) per key.
Snapshot = dict[str, tuple[str, str | None, int]]


def probe(*, username: str = PROBE_USER, limit: int = LIMIT, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Create (or reset) ``username`` as a staff user holding only the view permission on
    Notification, log it in, and POST every Notification admin action (the site's
    ``delete_selected`` too) on up to ``limit`` failed, ``limit`` ambiguous and ``limit``
    scheduled notifications, once as the action menu sends it and once with a confirmation.
    Keys starting with one of ``skip`` are never selected: a caller cancelling its own
    notifications meanwhile makes the change the probe looks for, and no action made it.

    Returns a JSON-ready report: the actions the changelist offered the user, how many
    notifications were selected, and per action the changes seen in the selected rows
    (status, sent-email state, number of outbox rows); ``changed`` is true when any
    action changed anything. Database errors propagate.
    """
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.test.utils import setup_test_environment, teardown_test_environment

    with ExitStack() as stack:
        try:
            setup_test_environment()  # lets the test client's 'testserver' host in
        except RuntimeError:
            pass  # already set up (under a test runner): leave it to its owner
        else:
            stack.callback(teardown_test_environment)
        try:
            settings.SECRET_KEY  # noqa: B018  (raises when the key is empty)
        except ImproperlyConfigured:
            # A process without DJANGO_SECRET_KEY (as the chaos run's are): the probe's
            # session is signed with a key of its own for the call, then the key is empty
            # again. (override_settings cannot: it reads the empty key back on exit.)
            settings.SECRET_KEY = secrets.token_urlsafe(50)
            stack.callback(setattr, settings, "SECRET_KEY", "")
        return _probe(username, limit, skip)


def _probe(username: str, limit: int, skip: tuple[str, ...]) -> dict[str, Any]:
    from django.contrib import admin
    from django.test import Client
    from django.urls import reverse

    from ..conf import settings as conf
    from ..models import Notification, Status

    db = conf.DATABASE
    user = view_only_user(username)
    client = Client()
    client.force_login(user)
    changelist = reverse("admin:notifications_notification_changelist")

    page = client.get(changelist)
    offered = _offered(page)
    candidates = Notification.objects.using(db)
    for prefix in skip:
        candidates = candidates.exclude(key__startswith=prefix)
    failed, ambiguous, later = (
        list(candidates.filter(status=status).values_list("pk", flat=True)[:limit])
        for status in (Status.FAILED, Status.AMBIGUOUS, Status.SCHEDULED)
    )
    selected = failed + ambiguous + later

    model_admin = admin.site._registry[Notification]
    names = [name for name, _ in admin.site.actions]
    names += [a if isinstance(a, str) else a.__name__ for a in model_admin.actions or ()]
    actions: dict[str, dict[str, Any]] = {}
    for name in names:
        before = snapshot(selected)
        responses, shown = [], []
        for extra in ({}, {"index": "0", "post": "yes"}):
            data = {"action": name, "_selected_action": selected, **extra}
            response = client.post(changelist, data, follow=True)
            responses.append(response.status_code)
            shown += [str(m) for m in response.context["messages"]] if response.context else []
        actions[name] = {"responses": responses, "messages": shown, "changes": differences(before, snapshot(selected))}
    return {
        "user": username,
        "changelist": page.status_code,
        "offered": offered,
        "selected": {"failed": len(failed), "ambiguous": len(ambiguous), "scheduled": len(later)},
        "actions": actions,
        "changed": any(a["changes"] for a in actions.values()),
    }


def view_only_user(username: str) -> Any:
    """The probe's user: active staff, not a superuser, no groups, no password, and only
    the view permission on Notification (whatever it held before)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    model = get_user_model()
    user, _ = model._default_manager.get_or_create(**{model.USERNAME_FIELD: username}, defaults={"is_staff": True})
    user.is_staff = user.is_active = True
    user.is_superuser = False
    user.set_unusable_password()
    user.save()
    view = Permission.objects.get(content_type__app_label="notifications", codename="view_notification")
    user.groups.clear()
    user.user_permissions.set([view])
    return model._default_manager.get(pk=user.pk)  # without the cached permissions


def snapshot(ids: list[int]) -> Snapshot:
    """Status, sent-email state and outbox row count of the notifications ``ids``."""
    from django.db.models import Count

    from ..conf import settings as conf
    from ..models import Notification, OutboxMessage, SentEmail

    db = conf.DATABASE
    notes = dict(Notification.objects.using(db).filter(pk__in=ids).values_list("key", "status"))
    claims = dict(SentEmail.objects.using(db).filter(key__in=list(notes)).values_list("key", "state"))
    outbox = dict(
        OutboxMessage.objects.using(db)
        .filter(notification_id__in=ids)
        .values("notification__key")
        .annotate(rows=Count("id"))
        .values_list("notification__key", "rows")
    )
    return {key: (status, claims.get(key), outbox.get(key, 0)) for key, status in notes.items()}


# Statuses the pipeline moves on by itself; the actions act on failed and held ones.
IN_FLIGHT = ("scheduled", "created", "published", "sending", "retrying")


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per key whose row changed (or vanished) between the snapshots. A scheduled
    notification that fell due meanwhile and was published or sent is progress, not a
    change an action made; cancelling one is."""
    lines = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was is not None and now is not None and was[0] in IN_FLIGHT and "cancelled" not in now[:2]:
            continue  # on its way (fell due, sent, expired): the pipeline's doing, no action's
        if was != now:
            lines.append(f"{key}: {_show(was)} -> {_show(now)}")
    return lines


def _show(row: tuple[str, str | None, int] | None) -> str:
    if row is None:
        return "gone"
    status, claim, outbox = row
    return f"status {status}, sent-email {claim or 'none'}, {outbox} outbox row(s)"


def _offered(response: Any) -> list[str]:
    form = response.context["action_form"] if response.context else None
    return [] if form is None else [name for name, _ in form.fields["action"].choices if name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--username", default=PROBE_USER, help=f"The probe's user (default {PROBE_USER}).")
    parser.add_argument("--limit", type=int, default=LIMIT, help=f"Notifications of each status (default {LIMIT}).")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PREFIX",
        help="Never select keys starting with PREFIX (ones their caller cancels itself); repeatable.",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    report = probe(username=args.username, limit=args.limit, skip=tuple(args.skip))
    print(json.dumps(report, indent=2, sort_keys=True))
    return 1 if report["changed"] else 0


if __name__ == "__main__":
    sys.exit(main())
