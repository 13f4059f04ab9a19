"""``manage.py notifications status|retry|send|purge``: what an operator types and sees,
against the real database, workers and SMTP server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from notifications import notify, notify_many
from notifications.models import Notification, OutboxMessage, SentEmail
from notifications.status import snapshot
from tests.conftest import ROOT, child_env, notification_kwargs, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str, stdin: str | None = None) -> tuple[str, str]:
    """``manage.py notifications ARGS`` in this process: (stdout, stderr)."""
    out, err = StringIO(), StringIO()
    extra = {"stdin": StringIO(stdin)} if stdin is not None else {}
    call_command("notifications", *args, stdout=out, stderr=err, **extra)
    return out.getvalue(), err.getvalue()


def failed(reason: str = "550 5.1.1 No such user", record: str | None = "failed", **kwargs: Any) -> Notification:
    """A notification that ended failed, with its claim record (unless ``record`` is None)."""
    n = notify(**notification_kwargs(**kwargs))
    Notification.objects.filter(pk=n.pk).update(status="failed", last_error=reason)
    OutboxMessage.objects.filter(notification=n).update(published_at=timezone.now())
    if record:
        SentEmail.objects.create(key=n.key, notification=n, state=record, response=reason)
    return Notification.objects.get(pk=n.pk)


@pytest.fixture
def quiet(settings: Any) -> None:
    """No relay wake-ups: the rows stay where the test puts them."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


# status


def test_status_prints_the_operators_figures(quiet: None) -> None:
    failed()
    notify(**notification_kwargs())
    SentEmail.objects.create(
        key="tests:stuck:1", state="claimed", lease_expires_at=timezone.now() - timedelta(minutes=1)
    )

    out, _ = run("status")

    assert "Backlog       1 due (oldest " in out and ", 0 scheduled" in out
    assert "Lag (1 h)     p50 -  p99 -  max -  over 0 sent" in out
    assert "created 1" in out and "failed 1" in out and "sent 0" in out
    assert "scheduled 0" in out and "expired 0" in out and "cancelled 0" in out
    assert "Stuck claims  1" in out and "Held          0" in out
    assert "Later         0 waiting (0 normal, 0 high), none due" in out
    assert (
        "Queues        notifications.deliver.high 0 ready/0 consumers  notifications.deliver 0 ready/0 consumers" in out
    )


def test_status_shows_what_waits_for_later_and_the_new_states(quiet: None) -> None:
    from notifications import cancel

    first = notify(**notification_kwargs(send_at=timezone.now() + timedelta(minutes=10), priority="high"))
    notify(**notification_kwargs(send_at=timezone.now() + timedelta(days=1)))
    assert cancel(notify(**notification_kwargs(send_at=timezone.now() + timedelta(days=1))).key).in_time
    expired = failed(record="expired")
    Notification.objects.filter(pk=expired.pk).update(status="expired")

    out, _ = run("status", "--no-broker")
    due = timezone.localtime(first.send_at).strftime("%Y-%m-%d %H:%M:%S")
    assert f"Later         2 waiting (1 normal, 1 high), next due {due} " in out
    assert re.search(r"next due [^(]+\(in (599|600)\.\d\ds\)", out)
    assert "scheduled 2" in out and "expired 1" in out and "cancelled 1" in out
    assert "Queues" not in out


def test_status_json_is_the_snapshot(quiet: None) -> None:
    failed()
    out, _ = run("status", "--json")
    data = json.loads(out)
    expected = snapshot().as_dict()
    assert data["counts"] == expected["counts"] and data["counts"]["failed"] == 1
    assert set(data) == set(expected) | {"queues"}
    assert set(data) == {"counts", "backlog", "lag", "held", "stuck_claims", "scheduled", "queues", "taken_at"}
    assert data["backlog"] == {"due": 0, "scheduled": 0, "oldest_due_age": None}
    assert data["scheduled"] == {
        "waiting": 0,
        "by_priority": {"normal": 0, "high": 0},
        "next_due_at": None,
        "next_due_in": None,
    }
    assert data["queues"]["deliver_high"] == {"queue": "notifications.deliver.high", "ready": 0, "consumers": 0}
    assert data["queues"]["deliver"] == {"queue": "notifications.deliver", "ready": 0, "consumers": 0}
    assert json.loads(run("status", "--json", "--no-broker")[0])["queues"] is None


def test_status_check_fails_on_stuck_claims_and_held_notifications(quiet: None) -> None:
    run("status", "--check")  # an empty pipeline passes
    n = failed(record="held")
    Notification.objects.filter(pk=n.pk).update(status="ambiguous")
    SentEmail.objects.create(
        key="tests:stuck:1", state="claimed", lease_expires_at=timezone.now() - timedelta(minutes=1)
    )
    with pytest.raises(CommandError, match="1 stuck claim.*1 held ambiguous") as raised:
        run("status", "--check")
    assert raised.value.returncode == 1


# retry


def test_a_notification_failed_by_the_mail_server_is_found_and_retried(smtp_server: Any, workers: Any) -> None:
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="550 5.7.1 Relaying denied", times=-1))
    n = notify(**kwargs)
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="failed").exists(), what="failed")

    out, _ = run("retry", "--reason", "relaying denied", "--since", "10m")  # the dry run, by default
    assert out.splitlines()[0] == "1 failed notification(s) match."
    assert f"  {key}  " in out and "550 5.7.1 Relaying denied" in out
    assert "Dry run: nothing changed. Run again with --yes to retry them." in out
    assert Notification.objects.get(pk=n.pk).status == "failed"
    assert OutboxMessage.objects.filter(notification=n).count() == 1 and smtp_server.count(key) == 0

    with smtp_server.handler.lock:  # the mail server is fixed
        smtp_server.handler.plans[key].clear()
    out, _ = run("retry", "--key", key, "--yes")
    assert "1 notification(s) queued to retry." in out

    smtp_server.wait_received(key)
    sent = wait_for(lambda: Notification.objects.filter(pk=n.pk, status="sent").first(), what="sent")
    assert sent.attempts == 1 and SentEmail.objects.get(key=key).state == "sent"
    out, _ = run("retry", "--key", key, "--yes")  # sent now: nothing matches, nothing is sent
    assert out.startswith("0 failed notification(s) match.")
    assert smtp_server.count(key) == 1


def test_retry_never_reopens_a_key_whose_record_says_sent(quiet: None) -> None:
    # The status says failed but the record says sent (the status write was lost, say):
    # the record wins, since queueing it would send a second email.
    n = failed(record="sent")
    out, _ = run("retry", "--yes")
    assert "0 notification(s) queued to retry." in out and "1 left alone" in out
    assert Notification.objects.get(pk=n.pk).status == "failed"
    assert SentEmail.objects.get(key=n.key).state == "sent"
    assert OutboxMessage.objects.filter(notification=n).count() == 1


def test_retry_selects_by_service_reason_time_and_key(quiet: None) -> None:
    billing = failed("550 mailbox unavailable", service="billing")
    shop = failed("421 gave up after 4 attempts", service="shop")
    old = failed("550 mailbox unavailable", service="billing")
    Notification.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    failed(record=None, service="billing")  # failed before any claim: retried too

    def matched(*args: str) -> int:
        return int(run("retry", *args)[0].split()[0])

    assert matched() == 4
    assert matched("--service", "billing") == 3
    assert matched("--reason", "MAILBOX") == 2
    assert matched("--service", "billing", "--reason", "mailbox", "--since", "1d") == 1
    assert matched("--until", "2d") == 1
    assert matched("--since", (timezone.now() - timedelta(days=4)).isoformat(), "--until", "2d") == 1
    assert matched("--key", shop.key, "--key", billing.key) == 2
    assert matched("--status", "ambiguous", "--resend-ambiguous") == 0
    with pytest.raises(CommandError, match="--since: invalid time"):
        run("retry", "--since", "yesterday")


def test_resending_ambiguous_ones_needs_its_own_flag(quiet: None) -> None:
    held = failed("held: a send had started", record="held")
    Notification.objects.filter(pk=held.pk).update(status="ambiguous")
    with pytest.raises(CommandError, match="second copy.*--resend-ambiguous"):
        run("retry", "--status", "ambiguous", "--yes")
    assert Notification.objects.get(pk=held.pk).status == "ambiguous"

    out, _ = run("retry", "--status", "ambiguous", "--resend-ambiguous")
    assert "Run again with --resend-ambiguous --yes to resend them." in out
    out, _ = run("retry", "--status", "ambiguous", "--resend-ambiguous", "--yes")
    assert "1 notification(s) queued to resend." in out
    assert Notification.objects.get(pk=held.pk).status == "created"
    assert SentEmail.objects.get(key=held.key).state == "released"


def test_retry_says_why_it_leaves_expired_cancelled_and_past_expiry_ones_alone(quiet: None) -> None:
    expired = failed(record="expired")
    Notification.objects.filter(pk=expired.pk).update(status="expired")
    cancelled = failed(record="cancelled")
    Notification.objects.filter(pk=cancelled.pk).update(status="cancelled")
    too_late = failed(expires_at=timezone.now() + timedelta(hours=1))
    Notification.objects.filter(pk=too_late.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    retried = failed()

    out, _ = run("retry", "--key", expired.key, "--key", cancelled.key, "--key", too_late.key, "--key", retried.key)
    assert out.splitlines()[:4] == [
        "1 failed notification(s) match.",
        "1 more past their expires_at are left alone: a send now would come too late.",
        "1 expired notification(s) not retried: a send now would come after their expires_at (send a new "
        "notification if it is still wanted).",
        "1 cancelled notification(s) not retried: a cancel is a decision, not a failure (send a new notification "
        "if it was wrong).",
    ]
    assert f"  {retried.key}  " in out and too_late.key not in out
    out, _ = run("retry", "--yes")
    assert "1 notification(s) queued to retry." in out
    statuses = dict(Notification.objects.values_list("key", "status"))
    assert statuses == {
        expired.key: "expired",
        cancelled.key: "cancelled",
        too_late.key: "failed",
        retried.key: "created",
    }
    assert OutboxMessage.objects.filter(published_at__isnull=True).count() == 1


def test_a_large_retry_goes_in_chunks_and_shows_progress(quiet: None) -> None:
    made = notify_many(notification_kwargs() for _ in range(620))
    Notification.objects.filter(pk__in=[n.pk for n in made]).update(status="failed", last_error="550 bounce")
    out, err = run("retry", "--yes")
    assert "620 notification(s) queued to retry." in out
    assert err.splitlines() == ["retry: 500/620 (500 queued)", "retry: 620/620 (620 queued)"]
    assert Notification.objects.filter(status="created").count() == 620
    assert OutboxMessage.objects.filter(published_at__isnull=True).count() == 620 * 2


# cancel


def test_cancel_says_per_key_whether_it_was_in_time_and_exits_1_if_any_was_not(quiet: None) -> None:
    later = notify(**notification_kwargs(send_at=timezone.now() + timedelta(hours=1)))
    waiting = notify(**notification_kwargs())
    sent = failed(record="sent")
    Notification.objects.filter(pk=sent.pk).update(status="sent")
    unsure = failed(record="released")
    Notification.objects.filter(pk=unsure.pk).update(status="retrying")
    SentEmail.objects.filter(key=unsure.key).update(ambiguous_count=1)

    out, _ = run("cancel", later.key, waiting.key)
    assert out.splitlines() == [f"{later.key}  cancelled in time", f"{waiting.key}  cancelled in time"]
    assert Notification.objects.get(pk=later.pk).last_error == "cancelled from the command line"
    assert not OutboxMessage.objects.filter(notification__in=[later, waiting]).exists()  # nothing left to publish

    out = StringIO()
    with pytest.raises(CommandError, match="^3 of 4 not cancelled in time$") as raised:
        call_command(
            "notifications",
            "cancel",
            later.key,
            sent.key,
            unsure.key,
            "tests:nobody:0",
            "--reason",
            "a mistake",
            stdout=out,
        )
    assert raised.value.returncode == 1
    assert out.getvalue().splitlines() == [
        f"{later.key}  already cancelled",
        f"{sent.key}  too late (sent)",
        f"{unsure.key}  stopped, too late to be sure: an earlier send may have reached the mail server",
        "tests:nobody:0  unknown",
    ]
    assert Notification.objects.get(pk=unsure.pk).status == "cancelled"
    assert Notification.objects.get(pk=sent.pk).status == "sent"
    assert SentEmail.objects.get(key=unsure.key).response.startswith("a mistake; ")


def test_cancel_refuses_a_bad_reason_before_any_key(quiet: None) -> None:
    later = notify(**notification_kwargs(send_at=timezone.now() + timedelta(hours=1)))
    with pytest.raises(CommandError, match="nothing cancelled: reason: must not be empty \\(--reason\\)"):
        run("cancel", later.key, "--reason", " ")
    assert Notification.objects.get(pk=later.pk).status == "scheduled"


def test_cancel_refuses_an_empty_key_before_cancelling_any(quiet: None) -> None:
    later = notify(**notification_kwargs(send_at=timezone.now() + timedelta(hours=1)))
    with pytest.raises(CommandError, match="nothing cancelled: key: must be a notification key.*\\(KEY\\)"):
        run("cancel", later.key, "")
    assert Notification.objects.get(pk=later.pk).status == "scheduled"


def test_cancel_exit_codes_from_the_shell(quiet: None) -> None:
    later = notify(**notification_kwargs(send_at=timezone.now() + timedelta(hours=1)))

    def shell(*keys: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "notifications", "cancel", *keys],
            cwd=ROOT,
            env=child_env(NOTIFICATIONS_RELAY_ON_COMMIT="0"),
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = shell(later.key)
    assert (done.returncode, done.stdout) == (0, f"{later.key}  cancelled in time\n"), done.stderr
    done = shell(later.key, "tests:nobody:0")
    assert done.returncode == 1, done.stderr
    assert done.stdout == f"{later.key}  already cancelled\ntests:nobody:0  unknown\n"
    assert "1 of 2 not cancelled in time" in done.stderr


# send


def test_send_queues_one_notification_that_a_worker_delivers(
    smtp_server: Any, module_worker: Any, tmp_path: Path
) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Hello from the shell</p>", encoding="utf-8")
    args = [
        *_send_args("ops", "cli-1", "7", to="Ann <ann@example.com>", subject="From the shell"),
        *("--body-file", "-", "--html-file", str(html), "--from", "ops@example.com", "--metadata", '{"ticket": 42}'),
    ]
    out, _ = run(*args, stdin="Hello from the shell\n")
    n = Notification.objects.get(key="ops:cli-1:7")
    assert out.splitlines() == ["key ops:cli-1:7", "status created", f"id {n.pk}"]
    assert n.metadata == {"ticket": 42} and n.from_email == "ops@example.com"

    [received] = smtp_server.wait_received(n.key)
    assert received.message["Subject"] == "From the shell" and received.to == ["ann@example.com"]
    assert received.message.get_body(("plain",)).get_content().strip() == "Hello from the shell"
    assert received.message.get_body(("html",)).get_content().strip() == "<p>Hello from the shell</p>"
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="sent").exists(), what="sent")

    out, _ = run(*args, stdin="Hello from the shell\n")  # a repeat returns the same notification
    assert out.splitlines() == ["key ops:cli-1:7", "status sent", f"id {n.pk}"]
    assert smtp_server.count(n.key) == 1


def _send_args(service: str, nid: str, user: str, to: str = "ann@example.com", subject: str = "Hi") -> list[str]:
    return ["send", "--service", service, "--id", nid, "--user", user, "--to", to, "--subject", subject]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--to", "not an address", "--body", "x"], "to: .*\\(--to\\)"),
        (["--body", "x", "--metadata", "[1, 2"], "--metadata: not valid JSON"),
        (["--body", "x", "--metadata", "[1, 2]"], "metadata: .*\\(--metadata\\)"),
        (["--body", "x", "--from", "a\nb@example.com"], "from_email: .*\\(--from\\)"),
        (["--body-file", "/nonexistent/body.txt"], "--body-file: cannot read"),
    ],
)
def test_send_refuses_bad_input_naming_the_option(quiet: None, args: list[str], field: str) -> None:
    base = _send_args("ops", "bad", "7")
    if "--to" in args:
        base = base[: base.index("--to")] + base[base.index("--to") + 2 :]
    with pytest.raises(CommandError, match=field):
        run(*base, *args)
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


def test_send_with_bad_input_exits_1_from_the_shell() -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "notifications", *_send_args("ops", "x:y", "7"), "--body", "x"],
        cwd=ROOT,
        env=child_env(NOTIFICATIONS_RELAY_ON_COMMIT="0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "notification_id" in done.stderr and "(--id)" in done.stderr and done.stdout == ""
    assert not Notification.objects.exists()


# purge


def test_purge_reports_what_it_deletes_and_a_dry_run_deletes_nothing(quiet: None, settings: Any) -> None:
    old = failed()
    long_ago = timezone.now() - timedelta(days=40)
    Notification.objects.filter(pk=old.pk).update(created_at=long_ago)
    OutboxMessage.objects.filter(notification=old).update(published_at=long_ago)
    SentEmail.objects.filter(key=old.key).update(updated_at=long_ago)
    recent = failed()

    out, err = run("purge", "--dry-run")
    assert out.startswith("Would delete 1 outbox row(s), 1 sent-email record(s), 1 notification(s) in ")
    assert "purge notifications: would delete 1 so far" in err
    assert Notification.objects.filter(pk=old.pk).exists()

    out, err = run("purge", "--batch-size", "10")
    assert out.startswith("Deleted 1 outbox row(s), 1 sent-email record(s), 1 notification(s) in ")
    assert err.splitlines() == [
        "purge outbox: deleted 1 so far",
        "purge sent: deleted 1 so far",
        "purge notifications: deleted 1 so far",
    ]
    assert not Notification.objects.filter(pk=old.pk).exists() and Notification.objects.filter(pk=recent.pk).exists()
