"""``manage.py notifications status|retry|cancel|send|purge``: the pipeline from the shell.

``status`` reads the figures of ``notifications.status`` (the admin dashboard's) and the
broker's queues as the metrics do, ``retry`` goes through the admin's own requeue
function, ``cancel`` through the admin's cancel (``cancel()`` per key), ``send`` through
``notify()`` and ``purge`` through beat's retention pass, so the command line can do
nothing the rest cannot.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta
from typing import Any, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from notifications.conf import settings

CHUNK = 500  # notifications per requeue transaction
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# notify()'s keyword arguments as this command spells them, for its error messages.
OPTION_OF = {"notification_id": "--id", "user_id": "--user", "from_email": "--from", "html_body": "--html-file"}


def moment(value: str) -> datetime:
    """An ISO datetime (naive ones in the current time zone), or a duration before now
    (``90s``, ``30m``, ``2h``, ``7d``, ``1w``)."""
    found = DURATION.match(value.strip())
    if found:
        return timezone.now() - timedelta(**{UNITS[found[2]]: float(found[1])})
    parsed = parse_datetime(value.strip())
    if parsed is None:
        raise ValueError(value)
    return timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed


moment.__name__ = "time (ISO datetime or duration such as 2h)"  # argparse names the type in its error


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _moment(value: datetime | None) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z") if value else "-"


class Command(BaseCommand):
    help = "Operate the notification pipeline: status, retry, cancel, send, purge."
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", required=True, metavar="{status,retry,cancel,send,purge}")

        def command(name: str, help: str) -> CommandParser:
            sub = commands.add_parser(name, help=help, description=help)
            sub.add_argument("--database", default=None, help="Database alias (default: NOTIFICATIONS_DATABASE).")
            return sub

        status = command(
            "status", "Backlog, what waits for later, lag, counts by status, held and stuck claims, broker queues."
        )
        status.add_argument("--json", action="store_true", dest="as_json", help="Print the figures as one JSON object.")
        status.add_argument("--no-broker", action="store_true", help="Do not ask the broker for its queues.")
        status.add_argument(
            "--check",
            action="store_true",
            help="Exit 1 if claims are stuck, notifications are held, or the oldest due row is older than --max-age.",
        )
        status.add_argument("--max-age", type=float, default=60.0, help="Seconds, for --check (default 60).")

        retry = command(
            "retry", "Queue failed (or held ambiguous) notifications again. A dry run unless --yes is given."
        )
        retry.add_argument("--status", choices=["failed", "ambiguous"], default="failed")
        retry.add_argument(
            "--resend-ambiguous",
            action="store_true",
            help="Required with --status ambiguous: the recipient may have the email already and get a second copy.",
        )
        retry.add_argument("--service", help="Only this service.")
        retry.add_argument("--reason", help="Only those whose last error contains this text (any case).")
        retry.add_argument("--since", type=moment, help="Created at or after (ISO datetime, or 2h, 3d... ago).")
        retry.add_argument("--until", type=moment, help="Created before (ISO datetime, or 2h, 3d... ago).")
        retry.add_argument("--key", action="append", default=[], help="Only this key (repeatable).")
        retry.add_argument("--show", type=int, default=20, help="Keys listed in the dry run (default 20).")
        retry.add_argument("--yes", "--apply", action="store_true", dest="yes", help="Queue them (else: dry run).")

        cancel = command(
            "cancel",
            "Cancel notifications not yet sent, by key; say per key whether it was in time. Exits 1 if any was not.",
        )
        cancel.add_argument("keys", nargs="+", metavar="KEY", help="service:notification_id:user_id")
        cancel.add_argument(
            "--reason", default="cancelled from the command line", help="Recorded as the notification's last error."
        )

        send = command("send", "Queue one notification through notify() and print its key, status and id.")
        send.add_argument("--service", required=True)
        send.add_argument("--id", required=True, dest="notification_id", help="The notification id.")
        send.add_argument("--user", required=True, dest="user_id", help="The user id.")
        send.add_argument("--to", required=True, help="Recipient address.")
        send.add_argument("--subject", required=True)
        body = send.add_mutually_exclusive_group(required=True)
        body.add_argument("--body", help="Plain-text body.")
        body.add_argument("--body-file", help="Read the plain-text body from this file ('-': standard input).")
        send.add_argument("--html-file", help="Read the HTML body from this file.")
        send.add_argument("--from", dest="from_email", help="Sender address (default: DEFAULT_FROM_EMAIL).")
        send.add_argument("--metadata", help="A JSON object stored with the notification.")

        purge = command("purge", "Delete what is past retention now (what beat's notifications.purge does).")
        purge.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")
        purge.add_argument(
            "--batch-size", type=int, default=None, help="Rows per transaction (NOTIFICATIONS_PURGE_BATCH_SIZE)."
        )

    def handle(self, *args: Any, command: str, **options: Any) -> None:
        options["database"] = options["database"] or settings.DATABASE
        getattr(self, command)(**options)

    # -- status -------------------------------------------------------------------------

    def status(
        self, *, database: str, as_json: bool, check: bool, max_age: float, no_broker: bool, **options: Any
    ) -> None:
        from notifications.exposition import BROKER_TIMEOUT, broker_queues
        from notifications.status import snapshot

        snap = snapshot(using=database)
        queues = None if no_broker else broker_queues(timeout=BROKER_TIMEOUT)
        if as_json:
            data = snap.as_dict()
            data["queues"] = (
                None
                if queues is None
                else {role: {"queue": q, "ready": ready, "consumers": n} for role, (q, ready, n) in queues.items()}
            )
            self.stdout.write(json.dumps(data, sort_keys=True))
        else:
            b, lag, later = snap.backlog, snap.lag, snap.scheduled
            counts = "  ".join(f"{name} {count}" for name, count in snap.counts.items())
            by_priority = ", ".join(f"{count} {priority}" for priority, count in later.by_priority.items())
            self.stdout.write(
                f"Backlog       {b.due} due (oldest {_seconds(b.oldest_due_age)}), {b.scheduled} scheduled"
            )
            next_due = f"next due {_moment(later.next_due_at)} (in {_seconds(later.next_due_in)})"
            self.stdout.write(
                f"Later         {later.waiting} waiting ({by_priority}), "
                + (next_due if later.next_due_at else "none due")
            )
            self.stdout.write(
                f"Lag (1 h)     p50 {_seconds(lag.p50)}  p99 {_seconds(lag.p99)}  max {_seconds(lag.max)}"
                f"  over {lag.count} sent"
            )
            self.stdout.write(f"By status     {counts}")
            self.stdout.write(f"Held          {snap.held}")
            self.stdout.write(f"Stuck claims  {snap.stuck_claims}")
            if queues is None and not no_broker:
                self.stdout.write(f"Queues        the broker did not answer within {BROKER_TIMEOUT:g}s")
            elif queues is not None:
                shown = "  ".join(f"{q} {ready} ready/{n} consumers" for q, ready, n in queues.values())
                self.stdout.write(f"Queues        {shown}")
        if check:
            problems = []
            if snap.stuck_claims:
                problems.append(f"{snap.stuck_claims} stuck claim(s)")
            if snap.held:
                problems.append(f"{snap.held} held ambiguous notification(s) wait for a person")
            if (snap.backlog.oldest_due_age or 0) > max_age:
                problems.append(f"the oldest due outbox row waits {snap.backlog.oldest_due_age:.0f}s (> {max_age:g}s)")
            if problems:
                raise CommandError("; ".join(problems), returncode=1)

    # -- retry --------------------------------------------------------------------------

    def retry(self, *, database: str, status: str, resend_ambiguous: bool, show: int, yes: bool, **o: Any) -> None:
        from notifications.models import Notification, Status
        from notifications.requeue import RESEND, RETRY, matching, refusals, requeue

        if status == "ambiguous" and not resend_ambiguous:
            raise CommandError(
                "resending a held ambiguous notification may give its recipient a second copy (the mail server "
                "may have accepted the first): add --resend-ambiguous to do so, or close them in the admin"
            )
        kind = RESEND if status == "ambiguous" else RETRY
        selected = matching(
            kind,
            service=o["service"],
            reason=o["reason"],
            since=o["since"],
            until=o["until"],
            keys=o["key"],
            using=database,
        )
        # Past their expires_at: a send now would come too late (requeue leaves them too).
        late = selected.filter(expires_at__lte=timezone.now())
        late_count = late.count()
        if late_count:
            selected = selected.exclude(pk__in=late.values("pk"))
        ids = list(selected.values_list("id", flat=True))
        self.stdout.write(f"{len(ids)} {status} notification(s) match.")
        if late_count:
            self.stdout.write(
                f"{late_count} more past their expires_at are left alone: a send now would come too late."
            )
        if o["key"]:  # keys named, whatever their status: say why the expired and cancelled stay
            named = Notification.objects.using(database).filter(key__in=list(o["key"])).exclude(status=kind.status)
            verb = "retried" if kind is RETRY else "resent"
            for sentence in refusals(named, kind.status, using=database).messages(verb):
                self.stdout.write(sentence)
        if not yes:
            for key, error in selected.values_list("key", "last_error")[: max(show, 0)]:
                self.stdout.write(f"  {key}  {error.splitlines()[0] if error else ''}")
            if len(ids) > show > 0:
                self.stdout.write(f"  ... and {len(ids) - show} more")
            if ids:
                flag = " --resend-ambiguous" if kind is RESEND else ""
                self.stdout.write(f"Dry run: nothing changed. Run again with{flag} --yes to {kind.verb} them.")
            return
        queued = 0
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            # The status filter again: one that changed since the selection is left alone.
            queryset = Notification.objects.using(database).filter(pk__in=chunk, status=kind.status)
            queued += requeue(queryset, kind.from_states, Status.CREATED, using=database)
            if len(ids) > CHUNK:
                self.stderr.write(f"{kind.verb}: {start + len(chunk)}/{len(ids)} ({queued} queued)")
        self.stdout.write(f"{queued} notification(s) queued to {kind.verb}.")
        if queued < len(ids):
            self.stdout.write(
                f"{len(ids) - queued} left alone: their sent-email record says sent, or a worker holds them now, "
                "or their expires_at passed meanwhile."
            )

    # -- cancel -------------------------------------------------------------------------

    def cancel(self, *, database: str, keys: list[str], reason: str, **options: Any) -> None:
        from notifications import InvalidNotification
        from notifications.cancellation import STOPPED_IN_TIME, cancel_keys

        try:
            results = cancel_keys(keys, reason=reason, using=database)
        except InvalidNotification as exc:
            option = "KEY" if exc.field == "key" else f"--{exc.field}"
            raise CommandError(f"nothing cancelled: {exc} ({option})") from None
        for result in results:
            self.stdout.write(f"{result.key}  {result.describe()}")
        missed = [r for r in results if r.verdict not in STOPPED_IN_TIME]
        if missed:
            raise CommandError(f"{len(missed)} of {len(results)} not cancelled in time", returncode=1)

    # -- send ---------------------------------------------------------------------------

    def send(self, *, database: str, **o: Any) -> None:
        from notifications import InvalidNotification, notify

        stdin: TextIO = o.get("stdin") or sys.stdin
        body = o["body"] if o["body_file"] is None else _read(o["body_file"], stdin, "--body-file")
        html_body = _read(o["html_file"], stdin, "--html-file") if o["html_file"] else None
        metadata = None
        if o["metadata"] is not None:
            try:
                metadata = json.loads(o["metadata"])
            except ValueError as exc:
                raise CommandError(f"--metadata: not valid JSON ({exc})") from None
        try:
            n = notify(
                service=o["service"],
                notification_id=o["notification_id"],
                user_id=o["user_id"],
                to=o["to"],
                subject=o["subject"],
                body=body,
                html_body=html_body,
                from_email=o["from_email"],
                metadata=metadata,
                using=database,
            )
        except InvalidNotification as exc:
            option = OPTION_OF.get(exc.field, f"--{exc.field.replace('_', '-')}")
            raise CommandError(f"not sent, nothing written: {exc} ({option})") from None
        self.stdout.write(f"key {n.key}\nstatus {n.status}\nid {n.pk}")

    # -- purge --------------------------------------------------------------------------

    def purge(self, *, database: str, dry_run: bool, batch_size: int | None, **options: Any) -> None:
        from notifications import retention

        def progress(name: str, rows: int, total: int) -> None:
            self.stderr.write(f"purge {name}: {'would delete' if dry_run else 'deleted'} {total} so far")

        result = retention.purge(using=database, dry_run=dry_run, batch=batch_size, progress=progress)
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(
            f"{verb} {result.outbox} outbox row(s), {result.sent} sent-email record(s), "
            f"{result.notifications} notification(s) in {result.batches} batch(es), {result.seconds:.1f}s."
        )


def _read(path: str, stdin: TextIO, option: str) -> str:
    if path == "-":
        return stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{option}: cannot read {path!r} ({exc})") from None
