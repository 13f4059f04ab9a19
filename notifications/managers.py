"""All the SQL of the pipeline, as verbs on the model managers.

Idempotency is decided by constraints, never by check-then-insert: each verb is one
statement (or a few in the caller's transaction) whose conflict clause says what a
repeat means.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.db import connections, models
from django.utils import timezone

from .conf import settings

# requeue_unclaimed(keep=...): candidates read per page, and pages per pass at most.
KEEP_PAGE = 5000
KEEP_PAGES = 20

if TYPE_CHECKING:
    from .models import Notification

# What a broker message carries of each notification (with its creation time).
PAYLOAD_COLUMNS = (
    "key",
    "service",
    "notification_id",
    "user_id",
    "to",
    "from_email",
    "subject",
    "body",
    "html_body",
    "metadata",
    "template",
    "language",
    "send_at",
    "expires_at",
    "priority",
    "backend",
)
# Columns a notification is created with; the rest take their database defaults.
NOTIFICATION_COLUMNS = (*PAYLOAD_COLUMNS, "status")
# The value of a column a payload of an earlier release does not carry.
_ABSENT: dict[str, Any] = {"send_at": None, "expires_at": None, "priority": "normal"}
_MOMENTS = ("send_at", "expires_at")


KEY_AND_ID = '"key", "id"'

# Ends a cancelled claim's response when the cancel came too late to be sure nothing was sent.
LATE = "; an earlier send may have reached the mail server"

# What a repeat of a key must carry unchanged (the rest of the row is the key itself).
CONTENT_FIELDS = (
    "to",
    "subject",
    "body",
    "html_body",
    "from_email",
    "metadata",
    "template",
    "language",
    "send_at",
    "expires_at",
    "priority",
    "backend",
)
# What a template renders: a repeat of a templated key is compared by its template,
# language and the rest, not by this text, which an edit of the template may change.
RENDERED_FIELDS = ("subject", "body", "html_body")

# Rows per insert statement of notify_many(): 17 parameters each, far below
# PostgreSQL's 65535 parameters per statement.
INSERT_CHUNK = 1000


def parse_moment(value: Any) -> datetime | None:
    """A payload's ``send_at`` / ``expires_at`` (ISO text in a message) as a datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def differences(row: Mapping[str, Any], stored: Any) -> tuple[str, ...]:
    """The content fields in which a cleaned ``row`` differs from ``stored`` (another
    cleaned row, or a ``Notification``), in ``CONTENT_FIELDS`` order. Both sides are
    compared as stored: addresses normalised, metadata after a JSON round trip (what
    jsonb gives back)."""

    def value(source: Any, name: str) -> Any:
        return source[name] if isinstance(source, Mapping) else getattr(source, name)

    found = []
    templated = bool(value(row, "template"))
    for name in CONTENT_FIELDS:
        if templated and name in RENDERED_FIELDS:
            continue
        mine, theirs = value(row, name), value(stored, name)
        if name in _MOMENTS:
            mine, theirs = parse_moment(mine), parse_moment(theirs)
        if name == "metadata":
            mine = json.loads(json.dumps(mine or {}))
            if isinstance(stored, Mapping):
                theirs = json.loads(json.dumps(theirs or {}))
        if mine != theirs:
            found.append(name)
    return tuple(found)


def decode_metadata(value: Any) -> dict[str, Any]:
    """A payload's metadata as a dict.

    The relay sends it as JSON text, not as a JSON object inside the message: kombu's
    decoder reads any object with exactly the keys ``__type__`` and ``__value__`` as one
    of its typed values, so a caller's metadata could otherwise fail to decode (and the
    whole message with it) or arrive changed. Messages of earlier releases carry a dict.
    """
    if isinstance(value, str):
        decoded = json.loads(value)
        return decoded if isinstance(decoded, dict) else {}
    return dict(value or {})


def _prepared(using: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run a statement of the delivery hot path as a server-side prepared statement.

    Django's cursors bind parameters on the client, so PostgreSQL plans every statement
    anew; planning these CTEs costs more than running them. Prepared on the connection,
    a statement sent once per email is planned once per connection instead. Off with
    ``NOTIFICATIONS_PREPARED_STATEMENTS = False`` (PgBouncer in transaction mode, say).
    """
    import psycopg
    from psycopg.pq import ExecStatus

    wrapper = connections[using]
    if not settings.PREPARED_STATEMENTS:
        with wrapper.cursor() as django_cursor:
            django_cursor.execute(sql, params)
            return django_cursor.fetchall() if django_cursor.description else []
    wrapper.ensure_connection()
    raw = wrapper.connection
    if raw.prepare_threshold is None:  # Django's default: never prepare on its own
        raw.prepare_threshold = 2**31  # still never on its own; prepare=True now works
    # Django's wrapper turns psycopg's errors into django.db's (and marks the connection
    # as failed), as it does for its own cursors.
    with wrapper.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        cursor.execute(sql, params, prepare=True)
        # Not ``cursor.description``: that builds a column object per column, each call.
        result = cursor.pgresult
        return cursor.fetchall() if result is not None and result.status == ExecStatus.TUPLES_OK else []


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@functools.lru_cache(maxsize=64)
def _insert_sql(
    model: type[models.Model],
    rows: int,
    with_outbox: bool,
    columns: tuple[str, ...],
    returning: str,
    wake: str | None = None,
) -> str:
    """The insert of ``NotificationManager``: the same text for the same shape, built once.
    ``wake``: the relay's ``LISTEN`` channel, notified by the statement itself when it
    created a row (``wakeup``), so the commit that makes the rows visible wakes the relay."""
    from .models import OutboxMessage

    table = _q(model._meta.db_table)
    cols = ", ".join(_q(c) for c in columns)
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    values = ", ".join([one] * rows)
    # With the outbox row (notify()), the whole created rows come back, so only repeated
    # keys need reading; for record() the id is enough.
    if with_outbox:
        returning = ", ".join(_q(f.get_attname_column()[1] or f.name) for f in model._meta.concrete_fields)
    insert = f'INSERT INTO {table} ({cols}) VALUES {values} ON CONFLICT ("key") DO NOTHING RETURNING {returning}'
    if not with_outbox:
        return insert
    outbox = _q(OutboxMessage._meta.db_table)
    return (
        f"WITH ins AS ({insert}), "
        f'outbox AS (INSERT INTO {outbox} ("notification_id", "due_at", "priority") '
        f'SELECT "id", COALESCE("send_at", now()), "priority" FROM ins ORDER BY "id") '
        + (
            # A CTE with a volatile call is run once, where it is read: here as the
            # right side of a join on true, so every created row comes back once. The
            # channel is a hex identifier of our own making (``wakeup.channel``).
            f", wake AS (SELECT pg_notify('{wake}', '') WHERE EXISTS (SELECT FROM ins)) "
            f"SELECT ins.* FROM ins LEFT JOIN wake ON true"
            if wake
            else "SELECT * FROM ins"
        )
    )


class NotificationManager(models.Manager["Notification"]):
    def _insert_sql(
        self, rows: int, with_outbox: bool, columns: Sequence[str] = NOTIFICATION_COLUMNS, returning: str = '"id"'
    ) -> str:
        from . import wakeup

        wake = wakeup.in_insert() if with_outbox else None
        return _insert_sql(self.model, rows, with_outbox, tuple(columns), returning, wake)

    def _params(
        self, rows: Sequence[dict[str, Any]], using: str, columns: Sequence[str] = NOTIFICATION_COLUMNS
    ) -> list[Any]:
        conn = connections[using]
        metadata_field = self.model._meta.get_field("metadata")
        params: list[Any] = []
        now = timezone.now()
        for row in rows:
            for col in columns:
                value = row.get(col, _ABSENT.get(col, ""))
                if col == "metadata":
                    value = metadata_field.get_db_prep_save(decode_metadata(row.get("metadata")), conn)
                elif col in _MOMENTS:
                    value = parse_moment(value)
                elif col == "status":
                    send_at = parse_moment(row.get("send_at"))
                    value = "scheduled" if send_at is not None and send_at > now else "created"
                elif value is None:  # template, language, backend: empty when absent
                    value = ""
                params.append(value)
        return params

    def create_with_outbox(self, rows: Sequence[dict[str, Any]], using: str) -> tuple[list[Notification], set[int]]:
        """Insert notifications and their outbox rows, skipping keys that exist.

        Returns the notifications in the order of ``rows`` (existing ones for repeated
        keys) and the ids of those created by this call. Must run inside the caller's
        transaction: a concurrent insert of the same key waits for that transaction and
        then counts as a repeat, so two processes never both create a key.

        Rows go in key order, in statements of at most ``INSERT_CHUNK`` rows, so two
        overlapping batches take the unique index's locks in the same order and never
        deadlock. Raises ``NotificationConflict`` for a repeat whose content differs
        from the stored notification's (unless ``NOTIFICATIONS_KEY_REUSE = "return"``);
        the caller's savepoint or transaction then drops what this call inserted.
        """
        if not rows:
            return [], set()
        ordered = sorted(rows, key=lambda r: r["key"]) if len(rows) > 1 else list(rows)
        by_key: dict[str, Notification] = {}
        created: set[int] = set()
        # A repeated key is read back after the insert skipped it. Retention may delete
        # that finished notification in between; the key is then free, so it is
        # inserted again rather than reported missing.
        for _ in range(3):
            inserted = self._insert_chunks(ordered, using)
            by_key.update(inserted)
            created |= {n.pk for n in inserted.values()}
            unseen = {r["key"] for r in ordered} - inserted.keys()
            if unseen:  # only repeated keys need reading back
                by_key.update((n.key, n) for n in self.using(using).filter(key__in=unseen))
            ordered = [r for r in ordered if r["key"] not in by_key]
            if not ordered:
                break
        else:
            from .exceptions import NotificationError

            raise NotificationError(
                f"key {ordered[0]['key']!r} exists but this transaction's snapshot cannot see it "
                "(call notify() under READ COMMITTED)"
            )
        repeats = {key for key, n in by_key.items() if n.pk not in created}
        if repeats and settings.KEY_REUSE != "return":
            for row in rows:
                if row["key"] in repeats and (changed := differences(row, by_key[row["key"]])):
                    from .exceptions import NotificationConflict

                    raise NotificationConflict(changed[0], row["key"], changed)
        return [by_key[r["key"]] for r in rows], created

    def _insert_chunks(self, ordered: Sequence[dict[str, Any]], using: str) -> dict[str, Notification]:
        """Insert ``ordered`` (in key order, ``INSERT_CHUNK`` rows per statement); return
        the notifications created, by key (an existing key is skipped)."""
        by_key: dict[str, Notification] = {}
        conn = connections[using]
        fields = self.model._meta.concrete_fields
        metadata_field = self.model._meta.get_field("metadata")
        for start in range(0, len(ordered), INSERT_CHUNK):
            chunk = ordered[start : start + INSERT_CHUNK]
            sql, params = self._insert_sql(len(chunk), True), self._params(chunk, using)
            if len(ordered) == 1:  # notify(): the same statement every call, planned once per connection
                inserted = _prepared(using, sql, params)
            else:
                with conn.cursor() as cursor:
                    cursor.execute(sql, params)
                    inserted = cursor.fetchall()
            for values in inserted:
                record = dict(zip((f.attname for f in fields), values, strict=True))
                record["metadata"] = metadata_field.from_db_value(record["metadata"], None, conn)  # type: ignore[arg-type]
                notification = self.model.from_db(using, list(record), list(record.values()))
                by_key[notification.key] = notification
        return by_key

    def record(self, row: dict[str, Any], using: str) -> int:
        """Delivery side: make sure the notification is stored here, by key; return its id.

        The broker message carries the whole notification, so the service's database
        learns of notifications created in other services' databases (with their
        creation time).
        """
        return self.record_many([row], using)[row["key"]]

    def record_many(self, rows: Sequence[dict[str, Any]], using: str) -> dict[str, int]:
        """``record()`` for a batch: key -> id for every row, in one statement when they
        are all stored here already, and one more for the others.

        Rows are inserted in key order, so two workers recording overlapping batches
        take the unique index's locks in the same order and never deadlock. Existing
        rows come back from the statement's snapshot; a key committed by another
        transaction during the statement is read once more.
        """
        if not rows:
            return {}
        table = _q(self.model._meta.db_table)
        lookup = f'SELECT "key", "id" FROM {table} WHERE "key" = ANY(%s)'
        # Usually every row is here already (notify() wrote it in this database): one
        # small statement finds them, and only the others are inserted.
        found = dict(_prepared(using, lookup, [[r["key"] for r in rows]]))
        ordered = sorted((r for r in rows if r["key"] not in found), key=lambda r: r["key"])
        if not ordered:
            return found
        columns = (*NOTIFICATION_COLUMNS, "created_at")
        now = timezone.now()
        params = self._params([{**r, "created_at": r.get("created_at") or now} for r in ordered], using, columns)
        keys = [r["key"] for r in ordered]
        sql = (
            f"WITH ins AS ({self._insert_sql(len(ordered), False, columns, returning=KEY_AND_ID)}) "
            f'SELECT "key", "id" FROM ins UNION ALL {lookup}'
        )
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [*params, keys])
            found.update((key, int(pk)) for key, pk in cursor.fetchall())
        missing = [k for k in keys if k not in found]
        if missing:
            found.update(_prepared(using, lookup, [missing]))
        return found


@dataclass(frozen=True)
class PendingMessage:
    outbox_id: int
    notification_id: int
    payload: dict[str, Any]


class OutboxMessageManager(models.Manager[Any]):
    def claim_pending(self, limit: int, using: str) -> list[PendingMessage]:
        """Lock up to ``limit`` unpublished rows that are due, high priority first and
        then the earliest due, skipping rows another relay holds. Must run inside a
        transaction, which keeps the locks until it marks the rows published (or rolls
        back and leaves them for the next pass).

        One statement per priority, each an ordered scan of ``notifications_outbox_due``
        bounded by now: rows scheduled for later are never read."""
        from .models import Notification

        outbox = _q(self.model._meta.db_table)
        notif = _q(Notification._meta.db_table)
        cols = ", ".join(f"n.{_q(c)}" for c in PAYLOAD_COLUMNS)
        select = (
            f'SELECT o."id", n."id", n."created_at", {cols} FROM {outbox} o '
            f'JOIN {notif} n ON n."id" = o."notification_id" '
            f'WHERE o."published_at" IS NULL AND o."priority" = %s AND '
        )
        lock = 'ORDER BY o."due_at", o."id" LIMIT %s FOR UPDATE OF o SKIP LOCKED'
        due = f'{select} o."due_at" <= now() {lock}'
        # A row an earlier release wrote without a due time was due at once. Still read
        # from the index (its NULLs sort last, after every scheduled row), in a
        # statement of its own: an OR would make the scan read the scheduled rows.
        undated = f'{select} o."due_at" IS NULL {lock}'
        rows: list[tuple[Any, ...]] = []
        with connections[using].cursor() as cursor:
            for priority in ("high", "normal"):
                for sql in (due, undated):
                    if len(rows) >= limit:
                        break
                    cursor.execute(sql, [priority, limit - len(rows)])
                    rows += cursor.fetchall()
        out = []
        for row in rows:
            payload = dict(zip(PAYLOAD_COLUMNS, row[3:], strict=True))
            # Travels as JSON text (see ``decode_metadata``); Django's psycopg setup leaves
            # jsonb as text already.
            if not isinstance(payload["metadata"], str):
                payload["metadata"] = json.dumps(payload["metadata"])
            for name in _MOMENTS:
                if payload[name] is not None:
                    payload[name] = payload[name].isoformat()
            payload["created_at"] = row[2].isoformat()
            out.append(PendingMessage(outbox_id=row[0], notification_id=row[1], payload=payload))
        return out

    def high_due(self, using: str) -> bool:
        """Whether a high-priority row is due and unpublished (one index probe)."""
        return self.using(using).filter(published_at__isnull=True, priority="high", due_at__lte=timezone.now()).exists()

    def next_due_in(self, using: str, within: float) -> float | None:
        """Seconds until the next scheduled row falls due, if one does within ``within``
        seconds (None: none does), so the relay loop can wake for it on time."""
        table = _q(self.model._meta.db_table)
        first = (
            f'(SELECT min("due_at") FROM {table} WHERE "published_at" IS NULL AND "priority" = %s AND "due_at" > now())'
        )
        with connections[using].cursor() as cursor:
            cursor.execute(f"SELECT EXTRACT(EPOCH FROM LEAST({first}, {first}) - now())", ["high", "normal"])
            row = cursor.fetchone()
        if row is None or row[0] is None or float(row[0]) > within:
            return None
        return max(0.0, float(row[0])) if row and row[0] is not None else None

    def mark_published(self, outbox_ids: Sequence[int], using: str) -> None:
        """Mark rows published and their notifications ``published`` (created or
        scheduled ones: a worker may already have moved them further), in the relay's
        transaction. A scheduled one whose message is out is no longer waiting for its
        time, and the recovery of lost messages looks at it as at any published one."""
        from .models import Notification

        outbox = _q(self.model._meta.db_table)
        notif = _q(Notification._meta.db_table)
        sql = (
            f'WITH pub AS (UPDATE {outbox} SET "published_at" = now() '
            f'WHERE "id" = ANY(%s) RETURNING "notification_id") '
            f'UPDATE {notif} n SET "published_at" = COALESCE(n."published_at", now()), '
            f"\"status\" = CASE WHEN n.\"status\" IN ('created', 'scheduled') THEN 'published' ELSE n.\"status\" END, "
            f'"updated_at" = now() '
            f'FROM pub WHERE n."id" = pub."notification_id"'
        )
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [list(outbox_ids)])

    def mark_refused(self, refused: Sequence[tuple[int, str]], using: str) -> list[tuple[str, int]]:
        """End notifications the broker cannot carry ``failed`` with the reason, in the
        relay's transaction: any not sent, failed or held (a retry of one from the
        outbox too), with its claim if it was released for that retry. Returns the
        ``(key, id)`` of those it ended."""
        from .models import Notification, SentEmail

        notif = _q(Notification._meta.db_table)
        sent = _q(SentEmail._meta.db_table)
        with connections[using].cursor() as cursor:
            cursor.execute(
                f"WITH u AS (SELECT * FROM unnest(%s::bigint[], %s::text[]) AS u(id, reason)), "
                f'n AS (UPDATE {notif} n SET "status" = \'failed\', "last_error" = u.reason, "updated_at" = now() '
                f'FROM u WHERE n."id" = u.id '
                f"AND n.\"status\" NOT IN ('sent', 'failed', 'ambiguous', 'expired', 'cancelled') "
                f'RETURNING n."key", n."id", u.reason), '
                f'claims AS (UPDATE {sent} s SET "state" = \'failed\', "response" = n.reason, "token" = s."token" + 1, '
                f'"updated_at" = now() FROM n WHERE s."key" = n."key" AND s."state" = \'released\') '
                f'SELECT "key", "id" FROM n',
                [[pk for pk, _ in refused], [reason for _, reason in refused]],
            )
            return [(str(key), int(pk)) for key, pk in cursor.fetchall()]

    def queue_again(self, notification_ids: Sequence[int], using: str, due_in: float = 0.0) -> int:
        """A new unpublished row, due ``due_in`` seconds from now, for each notification
        that has none; return how many."""
        from .models import Notification

        outbox = _q(self.model._meta.db_table)
        notif = _q(Notification._meta.db_table)
        with connections[using].cursor() as cursor:
            cursor.execute(
                f'INSERT INTO {outbox} ("notification_id", "due_at", "priority") '
                f'SELECT n."id", now() + make_interval(secs => %s), n."priority" '
                f'FROM {notif} n WHERE n."id" = ANY(%s::bigint[]) '
                f'AND NOT EXISTS (SELECT 1 FROM {outbox} o WHERE o."notification_id" = n."id" '
                f'AND o."published_at" IS NULL) ORDER BY n."id"',
                [max(0.0, due_in), list(notification_ids)],
            )
            return cursor.rowcount

    def backlog(self, using: str = "default") -> int:
        return self.using(using).filter(published_at__isnull=True).count()


def _claimable(table: str) -> str:
    """SQL: the row may be taken over (released for a retry, or its holder's lease ran out)."""
    return f'({table}."state" = \'released\' OR ({table}."state" = \'claimed\' AND {table}."lease_expires_at" < now()))'


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a key for sending."""

    outcome: str  # "claimed" | "done" | "busy"
    token: int = 0
    attempts: int = 0
    ambiguous: bool = False  # the previous holder may have handed the message over
    retry_in: float = 0.0
    state: str = ""
    takeover: bool = False  # taken from a holder whose lease had run out


@dataclass(frozen=True)
class Finish:
    """An outcome to record under a fencing token (see ``SentEmailManager.settle``)."""

    key: str
    token: int
    state: str  # sent | failed | held | released
    response: str
    attempts: int
    ambiguous: bool = False


@dataclass(frozen=True)
class Finished:
    """What ``SentEmailManager.fail_unless_live`` recorded."""

    state: str  # failed | held
    reason: str
    ambiguous: bool


@dataclass(frozen=True)
class Start:
    """A claim about to be sent: ``send_started_at`` is committed before the SMTP transaction."""

    key: str
    token: int
    lease: float
    message_id: str


class SentEmailManager(models.Manager[Any]):
    def _table(self) -> str:
        return _q(self.model._meta.db_table)

    def claim_many(self, items: Sequence[tuple[str, int]], owner: str, lease: float, using: str) -> dict[str, Claim]:
        """Take the exclusive right to send each ``(key, notification id)`` for ``lease``
        seconds: key -> Claim, in one statement (two when some keys are taken).

        The unique key decides between racing workers. A row that is released, or
        claimed with an expired lease, is taken over with a larger fencing token; if its
        holder had started the SMTP transaction, the claim is ``ambiguous``. Keys go in
        sorted order, so overlapping batches lock the unique index in the same order.

        A live claim is never locked: new keys are inserted (``ON CONFLICT DO NOTHING``,
        which locks nothing that exists) and only claimable rows are taken over (locked
        in key order). ``ON CONFLICT DO UPDATE ... WHERE`` would lock every conflicting
        row until this transaction ends, live ones too, and a claimer paused or cut off
        in the middle of it would stop the live holder's renewals.
        """
        if not items:
            return {}
        t = self._table()
        ordered = sorted(items)
        sql = (
            f"WITH u AS (SELECT k, p, i FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS u(k, p, i)), "
            f'ins AS (INSERT INTO {t} ("key", "notification_id", "state", "token", "owner", '
            f'"lease_expires_at", "attempts", "ambiguous_count", "message_id", "response") '
            f"SELECT u.k, u.p, 'claimed', 1, %s, now() + make_interval(secs => %s), 0, 0, '', '' "
            f'FROM u ORDER BY u.i ON CONFLICT ("key") DO NOTHING '
            f'RETURNING "key", "token", "attempts", "send_started_at", false AS takeover), '
            f'takeable AS (SELECT s."id", s."state" AS was, u.p FROM {t} s JOIN u ON s."key" = u.k '
            f'WHERE {_claimable("s")} ORDER BY s."key" FOR UPDATE OF s), '
            f'up AS (UPDATE {t} s SET "token" = s."token" + 1, "owner" = %s, '
            f'"lease_expires_at" = now() + make_interval(secs => %s), "state" = \'claimed\', "updated_at" = now(), '
            f'"notification_id" = COALESCE(s."notification_id", takeable.p) FROM takeable WHERE s."id" = takeable."id" '
            f'RETURNING s."key", s."token", s."attempts", s."send_started_at", takeable.was = \'claimed\') '
            f"SELECT * FROM ins UNION ALL SELECT * FROM up"
        )
        claims: dict[str, Claim] = {}
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [[k for k, _ in ordered], [p for _, p in ordered], owner, lease, owner, lease])
            for key, token, attempts, started, takeover in cursor.fetchall():
                claims[key] = Claim(
                    "claimed", token=token, attempts=attempts, ambiguous=started is not None, takeover=bool(takeover)
                )
            others = [k for k, _ in ordered if k not in claims]
            if others:
                cursor.execute(
                    f'SELECT "key", "state", GREATEST(0, EXTRACT(EPOCH FROM "lease_expires_at" - now())) '
                    f'FROM {t} WHERE "key" = ANY(%s)',
                    [others],
                )
                for key, state, remaining in cursor.fetchall():
                    if state == "claimed":
                        claims[key] = Claim("busy", retry_in=float(remaining or 0) + 0.5, state=state)
                    else:
                        claims[key] = Claim("done", state=state)
        for key in others if others else []:
            claims.setdefault(key, Claim("busy", retry_in=1.0))  # purged between the statements
        return claims

    def mark_sending(self, claimed: Sequence[tuple[int, bool]], using: str) -> None:
        """Mark a batch's claimed notifications ``sending`` (counting the ones whose
        previous send's outcome is unknown), in one statement of the claim transaction."""
        from .models import Notification

        if not claimed:
            return
        n = _q(Notification._meta.db_table)
        with connections[using].cursor() as cursor:
            cursor.execute(
                f'UPDATE {n} x SET "status" = \'sending\', "ambiguous_count" = x."ambiguous_count" + u.amb, '
                f'"updated_at" = now() FROM unnest(%s::bigint[], %s::int[]) AS u(id, amb) WHERE x."id" = u.id',
                [[pk for pk, _ in claimed], [1 if amb else 0 for _, amb in claimed]],
            )

    def settle(self, finished: Sequence[Finish], start: Start | None, using: str) -> tuple[set[str], bool]:
        """``settle_group`` with at most one start: (keys written, whether the start was)."""
        written, started = self.settle_group(finished, [start] if start is not None else [], using)
        return written, start is not None and start.key in started

    def settle_group(
        self, finished: Sequence[Finish], starts: Sequence[Start], using: str
    ) -> tuple[set[str], set[str]]:
        """Record outcomes and stamp the next sends, in one statement (one commit).

        Each outcome is written under its fencing token, to the claim and to its
        notification; each of ``starts`` sets ``send_started_at`` on a claim about to be
        sent (renewing its lease). A sending lane records a group's outcomes and stamps
        the next group at once, so a group costs one round trip and one commit, and the
        window of unknown outcome is the group (``NOTIFICATIONS_RECORD_GROUP``). Returns
        the keys whose outcome was written and the keys whose start was (a key missing
        there: its token is stale, another worker took over).
        """
        from .models import Notification

        start = starts[0] if len(starts) == 1 else None
        if not finished and not starts:
            return set(), set()
        t = self._table()
        n = _q(Notification._meta.db_table)
        parts: list[str] = []
        params: list[Any] = []
        selects: list[str] = []
        if finished:
            # One outcome (a lane's every email) as scalars: dumping six one-element
            # arrays costs the worker more than the rest of the call.
            values = (
                "SELECT %s::text AS k, %s::bigint AS token, %s::text AS state, %s::text AS response, "
                "%s::int AS amb, %s::int AS attempts"
                if len(finished) == 1
                else "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::int[], "
                "%s::int[]) AS u(k, token, state, response, amb, attempts)"
            )
            parts.append(
                f"v AS ({values}), "
                f'f AS (UPDATE {t} s SET "state" = v.state, "send_started_at" = NULL, "response" = v.response, '
                f'"lease_expires_at" = NULL, "ambiguous_count" = s."ambiguous_count" + v.amb, "attempts" = v.attempts, '
                f'"sent_at" = CASE WHEN v.state = \'sent\' THEN now() ELSE s."sent_at" END, '
                f'"updated_at" = now() FROM v WHERE s."key" = v.k AND s."token" = v.token '
                # The keys again as a plain condition: with only the join, the generic
                # plan of the prepared statement scans every claimed row for a group.
                + ('AND s."key" = ANY(%s::text[]) ' if len(finished) > 1 else "")
                + f'AND s."state" = \'claimed\' RETURNING s."key", s."notification_id"), '
                f"fn AS (UPDATE {n} x SET \"status\" = CASE v.state WHEN 'sent' THEN 'sent' "
                f"WHEN 'failed' THEN 'failed' WHEN 'held' THEN 'ambiguous' WHEN 'expired' THEN 'expired' "
                f"ELSE 'retrying' END, "
                f'"attempts" = v.attempts, "ambiguous_count" = x."ambiguous_count" + v.amb, '
                f"\"last_error\" = CASE WHEN v.state = 'sent' THEN '' ELSE left(v.response, 2000) END, "
                f'"sent_at" = CASE WHEN v.state = \'sent\' THEN now() ELSE x."sent_at" END, '
                f'"updated_at" = now() FROM f JOIN v ON v.k = f."key" WHERE x."id" = f."notification_id")'
            )
            each = [(f.key, f.token, f.state, f.response[:2000], 1 if f.ambiguous else 0, f.attempts) for f in finished]
            params += each[0] if len(each) == 1 else [list(column) for column in zip(*each, strict=True)]
            if len(finished) > 1:
                params.append([f.key for f in finished])
            selects.append("SELECT 'f', \"key\" FROM f")
        if len(starts) > 1:
            parts.append(
                f'st AS (UPDATE {t} s SET "send_started_at" = now(), "attempts" = s."attempts" + 1, '
                f'"lease_expires_at" = now() + make_interval(secs => %s), "message_id" = u.mid, "updated_at" = now() '
                f"FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS u(k, token, mid) "
                f'WHERE s."key" = u.k AND s."token" = u.token AND s."key" = ANY(%s::text[]) '
                f'AND s."state" = \'claimed\' RETURNING s."key")'
            )
            keys = [st.key for st in starts]
            lease = max(st.lease for st in starts)
            params += [lease, keys, [st.token for st in starts], [st.message_id for st in starts], keys]
            selects.append("SELECT 's', \"key\" FROM st")
        if start is not None:
            parts.append(
                f'st AS (UPDATE {t} SET "send_started_at" = now(), "attempts" = "attempts" + 1, '
                f'"lease_expires_at" = now() + make_interval(secs => %s), "message_id" = %s, "updated_at" = now() '
                f'WHERE "key" = %s AND "token" = %s AND "state" = \'claimed\' '
                f'RETURNING "key")'
            )
            params += [start.lease, start.message_id, start.key, start.token]
            selects.append("SELECT 's', \"key\" FROM st")
        sql = "WITH " + ", ".join(parts) + " " + " UNION ALL ".join(selects)
        rows = _prepared(using, sql, params)
        return {key for kind, key in rows if kind == "f"}, {key for kind, key in rows if kind == "s"}

    def renew(self, held: Sequence[tuple[str, int]], lease: float, using: str) -> tuple[set[str], set[str]]:
        """Extend the leases of ``(key, token)`` claims this worker still holds by ``lease``
        seconds from now, in one statement: (the keys renewed, the keys lost: taken over
        or settled elsewhere). A row another transaction has locked right now is skipped,
        neither renewed nor lost: the next round renews it (waiting for the lock would
        hold up the renewal of every other claim)."""
        if not held:
            return set(), set()
        t = self._table()
        ordered = sorted(held)
        pairs: list[Any] = [[k for k, _ in ordered], [tok for _, tok in ordered]]
        mine = (
            f'SELECT s."id", s."key" FROM {t} s JOIN unnest(%s::text[], %s::bigint[]) AS u(k, token) '
            f'ON s."key" = u.k AND s."token" = u.token WHERE s."state" = \'claimed\''
        )
        sql = (
            f'WITH mine AS ({mine} ORDER BY s."key" FOR UPDATE OF s SKIP LOCKED) '
            f'UPDATE {t} s SET "lease_expires_at" = now() + make_interval(secs => %s) '
            f'FROM mine WHERE s."id" = mine."id" RETURNING s."key"'
        )
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [*pairs, lease])
            renewed = {row[0] for row in cursor.fetchall()}
            if len(renewed) == len(ordered):
                return renewed, set()
            cursor.execute(mine, pairs)  # a plain read: skipped rows are still ours
            ours = {row[1] for row in cursor.fetchall()}
        return renewed, {k for k, _ in ordered} - ours

    def fail_unless_live(
        self, key: str, notification_pk: int, reason: str, hold: bool, using: str, released: bool = False
    ) -> Finished | None:
        """Record ``key`` as failed if no worker ever claimed it, or its holder died (an
        expired claim); return what was recorded, or None. A key that was sent, is
        finished, is held by a live worker, or was released for a retry (whose message
        is on its way, or is recovered) is left alone; with ``released``, a released one
        is failed too (the retry's message itself is what cannot be delivered).

        A claim whose holder had started the SMTP transaction may have reached the mail
        server: that is counted ambiguous, and with ``hold`` (at-most-once) the key is
        held for a person instead of failed, so that no retry can send it twice. Must run
        in a transaction (the row is locked while deciding).
        """
        t = self._table()
        dead = f'({t}."state" = \'claimed\' AND {t}."lease_expires_at" < now())'
        if released:
            dead = f"({dead} OR {t}.\"state\" = 'released')"
        with connections[using].cursor() as cursor:
            cursor.execute(
                f'SELECT "send_started_at" IS NOT NULL FROM {t} WHERE "key" = %s AND {dead} FOR UPDATE',
                [key],
            )
            row = cursor.fetchone()
            started = bool(row and row[0])
            state = "held" if started and hold else "failed"
            if started:
                reason += "; a send had started, so the mail server may have the email"
                if hold:
                    reason = f"held: {reason}; decide in the admin"
            cursor.execute(
                f'INSERT INTO {t} ("key", "notification_id", "state", "token", "owner", "attempts", '
                f'"ambiguous_count", "message_id", "response") VALUES (%s, %s, %s, 1, \'\', 0, 0, \'\', %s) '
                f'ON CONFLICT ("key") DO UPDATE SET "state" = EXCLUDED."state", "response" = EXCLUDED."response", '
                f'"token" = {t}."token" + 1, "send_started_at" = NULL, "lease_expires_at" = NULL, '
                f'"ambiguous_count" = {t}."ambiguous_count" + %s, "updated_at" = now() '
                f"WHERE {dead} "
                f'RETURNING "id"',
                [key, notification_pk, state, reason, 1 if started else 0],
            )
            if cursor.fetchone() is None:
                return None
        return Finished(state=state, reason=reason, ambiguous=started)

    def cancel(self, key: str, notification_pk: int, reason: str, using: str) -> tuple[bool, bool, str]:
        """Stop ``key`` from being sent: (whether it is stopped, whether that was in time,
        the claim's state). Decided on the claim row, locked, so a cancel racing a worker
        has one outcome. Must run in the caller's transaction.

        - nobody claimed it, or its holder has not yet stamped a send: stopped in time
          (``cancelled`` under a new fencing token, so the holder's stamp fails and it
          sends nothing);
        - released for a retry: stopped; in time unless an earlier attempt's outcome was
          unknown (the mail server may have it);
        - its holder died mid-send (an expired lease, a send stamped): stopped, not in
          time (the takeover would have resent it);
        - a live holder is handing it over now, or it is finished: too late, unchanged.
        """
        t = self._table()
        with connections[using].cursor() as cursor:
            for _ in range(3):
                cursor.execute(
                    f'SELECT "state", "send_started_at" IS NOT NULL, "lease_expires_at" < now(), "ambiguous_count" '
                    f'FROM {t} WHERE "key" = %s FOR UPDATE',
                    [key],
                )
                row = cursor.fetchone()
                if row is None:
                    cursor.execute(
                        f'INSERT INTO {t} ("key", "notification_id", "state", "token", "owner", "attempts", '
                        f'"ambiguous_count", "message_id", "response") '
                        f"VALUES (%s, %s, 'cancelled', 1, '', 0, 0, '', %s) "
                        f'ON CONFLICT ("key") DO NOTHING RETURNING "id"',
                        [key, notification_pk, reason],
                    )
                    if cursor.fetchone() is not None:
                        return True, True, "cancelled"
                    continue  # a worker claimed it meanwhile: decide on its row
                state, started, expired, ambiguous = row
                if state == "cancelled":  # a repeat: the first cancel's answer, kept in its response
                    cursor.execute(f'SELECT "response" FROM {t} WHERE "key" = %s', [key])
                    return True, LATE not in str(cursor.fetchone()[0]), "cancelled"
                if state == "released":
                    in_time = not ambiguous
                elif state == "claimed" and not started:
                    in_time = True
                elif state == "claimed" and expired:
                    in_time = False
                else:
                    return False, False, "sending" if state == "claimed" else str(state)
                cursor.execute(
                    f'UPDATE {t} SET "state" = \'cancelled\', "token" = "token" + 1, "response" = %s, '
                    f'"lease_expires_at" = NULL, "send_started_at" = NULL, "updated_at" = now() WHERE "key" = %s',
                    [reason if in_time else f"{reason}{LATE}", key],
                )
                return True, in_time, "cancelled"
        raise AssertionError("the claim row kept changing under the cancel")

    def reopen(self, keys: Sequence[str], from_states: Sequence[str], using: str) -> int:
        """Make finished keys claimable again (admin retry); never a sent one."""
        assert "sent" not in from_states
        with connections[using].cursor() as cursor:
            cursor.execute(
                f'UPDATE {self._table()} SET "state" = \'released\', "send_started_at" = NULL, '
                f'"attempts" = 0, "updated_at" = now() WHERE "key" = ANY(%s) AND "state" = ANY(%s)',
                [list(keys), list(from_states)],
            )
            return cursor.rowcount

    def stuck(self, using: str = "default") -> models.QuerySet[Any]:
        """Claims whose lease has run out: their worker died or is paused."""
        return self.using(using).filter(state="claimed", lease_expires_at__lt=timezone.now())

    def requeue_stalled(self, expired_for: float, quiet_for: float, released_for: float, using: str) -> list[str]:
        """Give stalled keys a new outbox row; return their keys.

        Stalled is either of:

        - claimed, with a lease expired ``expired_for`` seconds ago and no write for
          ``quiet_for`` seconds: its holder died or was cut off and stopped renewing. Its
          message may be held by a worker that cannot finish it (cut off from the
          database) until the task's hard time limit, so the key does not wait for it:
          the new row's message takes the claim over (counted ambiguous if a send had
          started);
        - released for a retry and untouched for ``released_for`` seconds: the message
          that should carry the retry was lost (a publish that failed, a dead letter).

        The row is touched, so the next pass leaves it alone for ``quiet_for`` seconds;
        the claim still allows one email, whatever else is in flight for the key.
        """
        from .models import Notification, OutboxMessage

        notif = _q(Notification._meta.db_table)

        t = self._table()
        outbox = _q(OutboxMessage._meta.db_table)
        sql = (
            f'WITH stalled AS (UPDATE {t} SET "updated_at" = now() WHERE "id" IN ('
            f'SELECT "id" FROM {t} WHERE "notification_id" IS NOT NULL AND ('
            f'("state" = \'claimed\' AND "lease_expires_at" < now() - make_interval(secs => %s) '
            f'AND "updated_at" < now() - make_interval(secs => %s)) OR '
            f'("state" = \'released\' AND "updated_at" < now() - make_interval(secs => %s))) '
            f'ORDER BY "id" LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING "key", "notification_id"), '
            f'queued AS (INSERT INTO {outbox} ("notification_id", "priority") '
            f'SELECT "notification_id", (SELECT n."priority" FROM {notif} n WHERE n."id" = stalled."notification_id") '
            f"FROM stalled WHERE NOT EXISTS (SELECT 1 FROM {outbox} o "
            f'WHERE o."notification_id" = stalled."notification_id" AND o."published_at" IS NULL)) '
            f'SELECT "key" FROM stalled'
        )
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [expired_for, quiet_for, released_for])
            return [row[0] for row in cursor.fetchall()]

    def requeue_unclaimed(
        self,
        older_than: float,
        using: str,
        at_most: int = 3,
        keep: Callable[[str, str], bool] | None = None,
    ) -> list[str]:
        """Give a new outbox row to notifications whose last message, published
        ``older_than`` seconds ago, no worker took: never claimed, or still released
        for the retry that message carried. Return their keys.

        Their message was lost before any worker recorded it: dropped by a broker or a
        person (a purged queue, a Kafka broker that lost its log), or held by a worker
        cut off from its database. Scheduled and retrying notifications count as much
        as first sends: the due time only decides when their message is published.
        With ``keep``, only notifications for which ``keep(user_id, priority)`` is true
        are looked at (on Kafka: those whose partition the group has read to its end).

        Only rows published from this database are seen, so run it where the
        notifications are relayed and delivered (in this project, one database). A
        notification gets at most ``at_most`` such messages, and none once it is older
        than half the sent-email retention: run by mistake in a calling service's
        database (where no claim is ever recorded), it costs a few messages whose claims
        are settled, and never a second email after the service has purged its records.
        Touches ``updated_at`` (the relay does again when it publishes), so a key is
        requeued at most once per ``older_than``.
        """
        from .models import Notification, OutboxMessage

        t = self._table()
        notification = _q(Notification._meta.db_table)
        outbox = _q(OutboxMessage._meta.db_table)
        retention = int(settings.SENT_RETENTION_DAYS) * 86400 / 2
        # One look at its outbox rows: when its last message went out (the notification's
        # own first publish if the rows are gone: pruned, or never kept), and whether a
        # row still waits to be published.
        lost = (
            f'SELECT n."id", n."user_id", n."priority" FROM {notification} n LEFT JOIN {t} s ON s."key" = n."key" '
            f'CROSS JOIN LATERAL (SELECT COALESCE(max(o."published_at"), n."published_at") AS "at", '
            f'COALESCE(bool_or(o."published_at" IS NULL), false) AS "waiting" '
            f'FROM {outbox} o WHERE o."notification_id" = n."id") m '
            f"WHERE n.\"status\" IN ('published', 'scheduled', 'retrying') "
            f'AND n."published_at" > now() - make_interval(secs => %s) '
            f'AND n."updated_at" < now() - make_interval(secs => %s) AND n."recoveries" < %s '
            f'AND m."at" < now() - make_interval(secs => %s) AND NOT m."waiting" '
            f'AND (s."id" IS NULL OR (s."state" = \'released\' AND s."updated_at" < m."at")) '
        )
        params: list[Any] = [retention, older_than, at_most, older_than]
        with connections[using].cursor() as cursor:
            if keep is not None:
                # Page on: a stalled partition's thousands of waiting rows must not hide
                # the lost ones of other partitions behind them.
                ids: list[int] = []
                after = 0
                for _ in range(KEEP_PAGES):
                    cursor.execute(lost + 'AND n."id" > %s ORDER BY n."id" LIMIT %s', [*params, after, KEEP_PAGE])
                    rows = cursor.fetchall()
                    ids += [pk for pk, user, priority in rows if keep(str(user), str(priority))]
                    if len(rows) < KEEP_PAGE or len(ids) >= 1000:
                        break
                    after = rows[-1][0]
                if not ids:
                    return []
                ids = ids[:1000]
                lost += 'AND n."id" = ANY(%s) '
                params.append(ids)
            cursor.execute(
                f'WITH lost AS (UPDATE {notification} SET "updated_at" = now(), "recoveries" = "recoveries" + 1 '
                f'WHERE "id" IN (SELECT "id" FROM ({lost} ORDER BY n."id" LIMIT 1000 FOR UPDATE OF n SKIP LOCKED) c) '
                f'RETURNING "id", "key", "priority"), '
                f'queued AS (INSERT INTO {outbox} ("notification_id", "priority") SELECT "id", "priority" FROM lost) '
                f'SELECT "key" FROM lost',
                params,
            )
            return [row[0] for row in cursor.fetchall()]
