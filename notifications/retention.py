"""Retention: what the pipeline deletes once it is old enough, in short batches that
never wait for a row someone else holds.

Three passes, in this order (beat's ``notifications.purge`` task and ``manage.py
notifications purge`` run the same code):

1. published outbox rows older than ``SENT_RETENTION_DAYS``;
2. finished sent-email records (``sent``, ``failed``, ``expired``, ``cancelled``) not written
   for ``SENT_RETENTION_DAYS``;
3. finished notifications (``sent``, ``failed``, ``expired``, ``cancelled``) created more than
   ``RETENTION_DAYS`` ago,
   with the outbox rows left to them, but only once their key has no sent-email record
   and no unpublished outbox row. A held ambiguous notification waits for a person.

The order is the deduplication window. While a notification's row exists, a repeat of
its key returns it; while its sent-email record exists, no worker sends the key again.
A notification is deleted only after its record, so a repeat of a key finds both or
neither: never a new notification that a worker refuses to send because the old record
says "sent". After the window a repeat of the key is a new notification and sends again.

Each batch is its own short transaction: ``FOR UPDATE SKIP LOCKED`` picks rows nobody
holds (a worker, the admin, an FK check of a concurrent insert), in the order of an
index with a keyset cursor, so every row is read once per run however many are left
behind; the deletes are plain SQL by id (no Django collector loading rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import OperationalError, connections, transaction
from django.utils import timezone
from psycopg.errors import LockNotAvailable

from .conf import settings

# A batch whose delete would wait for a lock longer than this is rolled back and left
# for the next run, rather than queue others behind the rows it holds.
LOCK_TIMEOUT = "2s"
START = ("-infinity", 0)  # the keyset cursor before the first row

Progress = Callable[[str, int, int], None]  # (pass, rows in this batch, rows so far in the pass)
Delete = Callable[[Any, list[tuple[Any, ...]]], int]  # (cursor, the batch's rows) -> rows counted


@dataclass
class PurgeResult:
    outbox: int = 0  # outbox rows: published ones past retention, and those of deleted notifications
    sent: int = 0  # sent-email records
    notifications: int = 0
    batches: int = 0
    skipped: int = 0  # rows left for the next run because a row they needed was locked
    seconds: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _table(model_name: str, using: str) -> str:
    from django.apps import apps

    return connections[using].ops.quote_name(apps.get_model("notifications", model_name)._meta.db_table)


class _Pass:
    """One pass: select a batch of ids after the cursor, delete them, commit, repeat."""

    def __init__(self, name: str, using: str, batch: int, dry_run: bool, progress: Progress | None) -> None:
        self.name, self.using, self.batch, self.dry_run, self.progress = name, using, batch, dry_run, progress
        self.rows = 0
        self.batches = 0
        self.skipped = 0  # rows of batches rolled back after a lock timeout

    def run(self, select: str, params: dict[str, Any], delete: Delete) -> None:
        """``select`` returns ``(id, sort key, ...)`` rows ordered by the sort key then id,
        after ``(%(after_key)s, %(after_id)s)``; ``delete`` removes (or, in a dry run,
        counts) a batch's rows with the cursor it is given and returns how many it counts."""
        lock = "" if self.dry_run else " FOR UPDATE SKIP LOCKED"
        after = START
        while True:
            found: list[tuple[Any, ...]] = []
            try:
                with transaction.atomic(using=self.using), connections[self.using].cursor() as cursor:
                    if not self.dry_run:
                        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    cursor.execute(
                        f"{select}{lock}", {**params, "after_key": after[0], "after_id": after[1], "limit": self.batch}
                    )
                    found = cursor.fetchall()
                    if not found:
                        return
                    count = delete(cursor, found)
            except OperationalError as exc:
                # A row the delete needs is held (say, an outbox row another purge is
                # deleting): this batch is rolled back and left for the next run.
                if not found or not isinstance(exc.__cause__, LockNotAvailable):
                    raise
                self.skipped += len(found)
                count = 0
            self.rows += count
            self.batches += 1
            if self.progress:
                self.progress(self.name, count, self.rows)
            if len(found) < self.batch:
                return
            after = (found[-1][1], found[-1][0])


def purge(
    *, using: str | None = None, dry_run: bool = False, batch: int | None = None, progress: Progress | None = None
) -> PurgeResult:
    """Delete what is past retention (see the module docstring); return the counts.

    ``dry_run`` counts what would be deleted and deletes nothing (it takes no locks, and
    counts the notifications whose records this run would delete first). Rows another
    transaction holds are skipped and left for the next run, as is a batch whose delete
    would wait longer than ``LOCK_TIMEOUT`` for a row (counted in ``skipped``).
    """
    db = using or settings.DATABASE
    size = int(batch or settings.PURGE_BATCH_SIZE)
    now = timezone.now()
    sent_before: datetime = now - timedelta(days=int(settings.SENT_RETENTION_DAYS))
    notifications_before: datetime = now - timedelta(days=int(settings.RETENTION_DAYS))
    outbox, sent, notification = (_table(m, db) for m in ("OutboxMessage", "SentEmail", "Notification"))
    started = time.monotonic()
    result = PurgeResult(dry_run=dry_run)

    def new_pass(name: str) -> _Pass:
        return _Pass(name, db, size, dry_run, progress)

    def delete_from(table: str) -> Delete:
        def delete(cursor: Any, rows: list[tuple[Any, ...]]) -> int:
            if not dry_run:
                cursor.execute(f'DELETE FROM {table} WHERE "id" = ANY(%s)', [[row[0] for row in rows]])
            return len(rows)

        return delete

    published = new_pass("outbox")
    published.run(
        f'SELECT "id", "published_at" FROM {outbox} WHERE "published_at" < %(before)s '
        f'AND ("published_at", "id") > (%(after_key)s::timestamptz, %(after_id)s) '
        f'ORDER BY "published_at", "id" LIMIT %(limit)s',
        {"before": sent_before},
        delete_from(outbox),
    )
    records = new_pass("sent")
    records.run(
        f'SELECT "id", "updated_at" FROM {sent} WHERE "updated_at" < %(before)s '
        f"AND \"state\" IN ('sent', 'failed', 'expired', 'cancelled') "
        f'AND ("updated_at", "id") > (%(after_key)s::timestamptz, %(after_id)s) '
        f'ORDER BY "updated_at", "id" LIMIT %(limit)s',
        {"before": sent_before},
        delete_from(sent),
    )

    left_outbox = 0

    def delete_notifications(cursor: Any, rows: list[tuple[Any, ...]]) -> int:
        nonlocal left_outbox
        # What keeps a notification, looked up for the batch by index (as separate
        # statements, so that no stale estimate of the pending rows can turn them into a
        # join against every pending row): a sent-email record of its key (in a dry run,
        # one the records pass would not delete), and an unpublished outbox row, which the
        # relay may hold while it publishes and then marks the notification.
        cursor.execute(
            f'SELECT "key" FROM {sent} WHERE "key" = ANY(%s) '
            f"AND NOT (%s AND \"state\" IN ('sent', 'failed', 'expired', 'cancelled') AND \"updated_at\" < %s)",
            [[row[2] for row in rows], dry_run, sent_before],
        )
        recorded = {key for (key,) in cursor.fetchall()}
        cursor.execute(
            f'SELECT "notification_id" FROM {outbox} WHERE "notification_id" = ANY(%s) AND "published_at" IS NULL',
            [[row[0] for row in rows]],
        )
        pending = {pk for (pk,) in cursor.fetchall()}
        ids = [pk for pk, _, key in rows if key not in recorded and pk not in pending]
        if not ids:
            return 0
        if dry_run:
            # Those the outbox pass would have deleted first are counted there.
            cursor.execute(
                f'SELECT count(*) FROM {outbox} WHERE "notification_id" = ANY(%s) '
                f'AND NOT coalesce("published_at" < %s, false)',
                [ids, sent_before],
            )
            left_outbox += cursor.fetchone()[0]
            return len(ids)
        # One statement; the foreign keys are checked at commit, when all three are done.
        # The record update keeps SentEmail's SET_NULL: no record of another key points
        # here in practice, and the key's own record is gone (looked up above).
        cursor.execute(
            f'WITH o AS (DELETE FROM {outbox} WHERE "notification_id" = ANY(%(ids)s) RETURNING 1), '
            f'r AS (UPDATE {sent} SET "notification_id" = NULL WHERE "notification_id" = ANY(%(ids)s) '
            f"RETURNING 1), "
            f'n AS (DELETE FROM {notification} WHERE "id" = ANY(%(ids)s) RETURNING 1) '
            f"SELECT (SELECT count(*) FROM o), (SELECT count(*) FROM n)",
            {"ids": ids},
        )
        outbox_rows, deleted = cursor.fetchone()
        left_outbox += outbox_rows
        return int(deleted)

    finished = new_pass("notifications")
    for status in ("sent", "failed", "expired", "cancelled"):  # one index range each: (status, created_at)
        finished.run(
            f'SELECT "id", "created_at", "key" FROM {notification} WHERE "status" = %(status)s '
            f'AND "created_at" < %(before)s AND ("created_at", "id") > (%(after_key)s::timestamptz, %(after_id)s) '
            f'ORDER BY "created_at", "id" LIMIT %(limit)s',
            {"status": status, "before": notifications_before},
            delete_notifications,
        )

    result.outbox = published.rows + left_outbox
    result.sent = records.rows
    result.notifications = finished.rows
    result.batches = published.batches + records.batches + finished.batches
    result.skipped = published.skipped + records.skipped + finished.skipped
    result.seconds = time.monotonic() - started
    return result
