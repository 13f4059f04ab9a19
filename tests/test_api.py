"""notify() and notify_many() in the caller's transaction: what they write, what a
rollback leaves, and one row per key, also when separate processes race for it."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction

import notifications
from notifications import InvalidNotification, NotificationConflict, NotificationError, notify, notify_many
from notifications.models import Notification, OutboxMessage
from tests.conftest import ROOT, child_env, notification_kwargs, wait_for
from tests.conftest import test_database_url as database_url


def keys() -> list[str]:
    return sorted(Notification.objects.values_list("key", flat=True))


@pytest.mark.django_db
def test_public_interface() -> None:
    assert notifications.notify is notify and notifications.InvalidNotification is InvalidNotification
    assert issubclass(InvalidNotification, ValueError) and issubclass(InvalidNotification, NotificationError)
    assert notifications.NotificationConflict is NotificationConflict
    assert issubclass(NotificationConflict, InvalidNotification)


@pytest.mark.django_db
def test_notify_writes_a_notification_and_one_unpublished_outbox_row() -> None:
    kwargs = notification_kwargs(service="billing", user_id=42)
    n = notify(**kwargs)
    stored = Notification.objects.get(pk=n.pk)
    assert stored.key == f"billing:{kwargs['notification_id']}:42"
    assert (stored.status, stored.attempts, stored.to, stored.subject) == (
        "created",
        0,
        "ann@example.com",
        "Your invoice",
    )
    [outbox] = OutboxMessage.objects.all()
    assert outbox.notification_id == n.pk and outbox.published_at is None


# The caller's transaction.


@pytest.mark.django_db(transaction=True)
def test_rejected_notify_does_not_poison_the_callers_transaction() -> None:
    with transaction.atomic():
        User.objects.create(username="before")
        with pytest.raises(InvalidNotification):
            notify(**notification_kwargs(to="ann.example.com"))
        assert not transaction.get_connection().needs_rollback
        n = notify(**notification_kwargs())
        User.objects.create(username="after")
    assert sorted(User.objects.values_list("username", flat=True)) == ["after", "before"]
    assert keys() == [n.key]
    assert OutboxMessage.objects.filter(notification=n).count() == 1


@pytest.mark.django_db(transaction=True)
def test_repeat_inside_the_callers_transaction_does_not_poison_it() -> None:
    kwargs = notification_kwargs()
    with transaction.atomic():
        first = notify(**kwargs)
        again = notify(**kwargs)  # the unique key conflicts here
        User.objects.create(username="after-the-repeat")
    assert again.pk == first.pk
    assert User.objects.filter(username="after-the-repeat").exists()
    assert keys() == [first.key] and OutboxMessage.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_leaves_no_rows() -> None:
    kwargs = notification_kwargs()
    with pytest.raises(RuntimeError, match="caller fails"), transaction.atomic():
        n = notify(**kwargs)
        assert Notification.objects.filter(pk=n.pk).exists()  # visible inside, until...
        raise RuntimeError("caller fails")
    assert not Notification.objects.exists()
    assert not OutboxMessage.objects.exists()
    # The key is free again: a later call creates it afresh.
    assert notify(**kwargs).pk != n.pk
    assert Notification.objects.count() == OutboxMessage.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_savepoint_drops_only_its_own_notification() -> None:
    with transaction.atomic():
        kept = notify(**notification_kwargs())
        with pytest.raises(RuntimeError), transaction.atomic():
            notify(**notification_kwargs())
            raise RuntimeError("inner block fails")
    assert keys() == [kept.key]
    assert list(OutboxMessage.objects.values_list("notification_id", flat=True)) == [kept.pk]


@pytest.mark.django_db(transaction=True)
def test_notify_outside_a_transaction_commits_on_its_own() -> None:
    n = notify(**notification_kwargs())
    assert not connection.in_atomic_block
    with psycopg.connect(database_url()) as other:  # another session sees it: committed
        count = other.execute(
            "SELECT count(*) FROM notifications_outboxmessage o "
            "JOIN notifications_notification n ON n.id = o.notification_id WHERE n.key = %s",
            [n.key],
        ).fetchone()
    assert count == (1,)


# Repeats of a key.


@pytest.mark.django_db
def test_same_key_twice_returns_the_first_notification_and_writes_once() -> None:
    kwargs = notification_kwargs(metadata={"invoice": 17})
    first = notify(**kwargs)
    again = notify(**kwargs)
    assert again.pk == first.pk
    assert (again.subject, again.to, again.metadata) == ("Your invoice", "ann@example.com", {"invoice": 17})
    assert Notification.objects.count() == 1 and OutboxMessage.objects.count() == 1


@pytest.mark.django_db
def test_same_key_with_different_content_is_a_conflict_naming_key_and_fields() -> None:
    """Finding: a repeat of a key with another to/subject/... silently returned the old
    notification and dropped the new email. It raises NotificationConflict now."""
    kwargs = notification_kwargs()
    first = notify(**kwargs)
    with pytest.raises(NotificationConflict) as caught:
        notify(**{**kwargs, "subject": "A different subject", "to": "bob@example.com"})
    error = caught.value
    assert isinstance(error, InvalidNotification) and isinstance(error, ValueError)
    assert (error.key, error.fields, error.field) == (first.key, ("to", "subject"), "to")
    assert str(error).startswith(
        f"to: key {first.key!r} is already used by a notification with a different to, subject"
    )
    assert list(Notification.objects.values_list("pk", "subject", "to")) == [(first.pk, "Your invoice", first.to)]
    assert OutboxMessage.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"to": "bob@example.com"}, "to", id="to"),
        pytest.param({"subject": "Other"}, "subject", id="subject"),
        pytest.param({"body": "Other"}, "body", id="body"),
        pytest.param({"html_body": "<p>Hi</p>"}, "html_body", id="html_body"),
        pytest.param({"from_email": "bill@example.com"}, "from_email", id="from_email"),
        pytest.param({"metadata": {"invoice": 18}}, "metadata", id="metadata"),
    ],
)
def test_each_content_field_counts_for_a_conflict(change: dict[str, Any], field: str) -> None:
    kwargs = notification_kwargs(metadata={"invoice": 17})
    notify(**kwargs)
    with pytest.raises(NotificationConflict) as caught:
        notify(**{**kwargs, **change})
    assert caught.value.fields == (field,) and caught.value.field == field


@pytest.mark.django_db
def test_repeats_compare_what_is_stored_not_how_it_was_written() -> None:
    """The comparison is between normalised values: the stored form of an address, and
    metadata after a JSON round trip (a tuple is a list, key order does not matter)."""
    kwargs = notification_kwargs(
        to='"Ann Example" <ann@example.com>', metadata={"tags": ("a", "b"), "n": 1, "nested": {"x": 1, "y": 2}}
    )
    first = notify(**kwargs)
    again = notify(
        **{
            **kwargs,
            "to": "Ann Example <ann@example.com>",
            "metadata": {"nested": {"y": 2, "x": 1}, "n": 1.0, "tags": ["a", "b"]},
        }
    )
    assert again.pk == first.pk and Notification.objects.count() == 1


@pytest.mark.django_db
def test_key_reuse_return_keeps_the_old_behaviour(settings: Any) -> None:
    settings.NOTIFICATIONS_KEY_REUSE = "return"
    kwargs = notification_kwargs()
    first = notify(**kwargs)
    again = notify(**{**kwargs, "subject": "A different subject", "to": "bob@example.com"})
    assert again.pk == first.pk
    assert (again.subject, again.to) == ("Your invoice", "ann@example.com")
    assert Notification.objects.count() == 1 and OutboxMessage.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_conflict_inside_the_callers_transaction_does_not_poison_it() -> None:
    kwargs = notification_kwargs()
    notify(**kwargs)
    with transaction.atomic():
        with pytest.raises(NotificationConflict):
            notify(**{**kwargs, "body": "Another body"})
        User.objects.create(username="after-the-conflict")
    assert User.objects.filter(username="after-the-conflict").exists()
    assert Notification.objects.get().body == "Hello Ann"


@pytest.mark.django_db
def test_int_and_text_ids_are_the_same_key() -> None:
    kwargs = notification_kwargs(notification_id=7, user_id=42)
    first = notify(**kwargs)
    again = notify(**{**kwargs, "notification_id": "7", "user_id": "42"})
    assert again.pk == first.pk and first.key == "tests:7:42"
    assert Notification.objects.count() == OutboxMessage.objects.count() == 1


@pytest.mark.django_db
def test_each_part_of_the_key_tells_notifications_apart() -> None:
    base = notification_kwargs(service="billing", notification_id="invoice-1", user_id="1")
    variants = [
        base,
        {**base, "service": "shipping"},
        {**base, "notification_id": "invoice-2"},
        {**base, "user_id": "2"},
    ]
    pks = {notify(**v).pk for v in variants}
    assert len(pks) == 4
    assert keys() == [
        "billing:invoice-1:1",
        "billing:invoice-1:2",
        "billing:invoice-2:1",
        "shipping:invoice-1:1",
    ]
    assert OutboxMessage.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_repeat_after_commit_returns_the_committed_notification() -> None:
    kwargs = notification_kwargs()
    first = notify(**kwargs)
    with transaction.atomic():
        again = notify(**kwargs)
    assert again.pk == first.pk
    assert Notification.objects.count() == OutboxMessage.objects.count() == 1


# Separate OS processes calling notify() with the same key.

CHILD = r"""
import json, sys
import django

django.setup()
from django.db import connection, transaction
from notifications import NotificationConflict, notify

kwargs, mode = json.loads(sys.argv[1]), sys.argv[2]


def say(**message):
    print(json.dumps(message), flush=True)


connection.ensure_connection()
say(ready=True, backend=connection.connection.info.backend_pid)
sys.stdin.readline()  # "go"
if mode == "hold":
    with transaction.atomic():
        n = notify(**kwargs)
        say(inserted=n.pk)
        outcome = sys.stdin.readline().strip()
        if outcome == "rollback":
            transaction.set_rollback(True)
    say(finished=n.pk, outcome=outcome)
else:
    try:
        say(returned=notify(**kwargs).pk)
    except NotificationConflict as exc:
        say(conflict=list(exc.fields), key=exc.key)
"""


class Child:
    """A separate Python process with its own database session, driven line by line."""

    def __init__(self, kwargs: dict[str, Any], mode: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(kwargs), mode],
            cwd=ROOT,
            env=child_env(),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.messages.put(json.loads(line))
        self.messages.put(None)

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from child within {timeout}s:\n{self.log.read_text()}") from None
        if message is None:
            raise AssertionError(f"child exited with {self.proc.wait()}:\n{self.log.read_text()}")
        return message

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def children(tmp_path: Path) -> Any:
    started: list[Child] = []

    def start(kwargs: dict[str, Any], mode: str = "call") -> Child:
        child = Child(kwargs, mode, tmp_path / f"child-{len(started)}.log")
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def waiting_on_a_lock(backend_pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
            [backend_pid],
        )
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.django_db(transaction=True)
def test_second_process_waits_for_the_first_and_gets_its_notification(children: Any) -> None:
    kwargs = notification_kwargs()
    first, second = children(kwargs, "hold"), children(kwargs)
    first.next()
    backend = second.next()["backend"]
    first.send("go")
    inserted = first.next()["inserted"]  # first's transaction is open, holding the key

    second.send("go")
    wait_for(
        lambda: waiting_on_a_lock(backend),
        timeout=20,
        what="second insert blocked on the first's key",
    )
    assert second.messages.empty()  # still inside notify()
    assert not Notification.objects.exists()  # nothing committed yet

    first.send("commit")
    assert first.next() == {"finished": inserted, "outcome": "commit"}
    assert second.next() == {"returned": inserted}
    assert list(Notification.objects.values_list("pk", "subject")) == [(inserted, "Your invoice")]
    assert list(OutboxMessage.objects.values_list("notification_id", flat=True)) == [inserted]


@pytest.mark.django_db(transaction=True)
def test_second_process_with_other_content_waits_and_then_gets_a_conflict(children: Any) -> None:
    """The unique key decides first (the second insert waits for the first's commit), and
    only then the content is compared: the second caller learns its email was not queued."""
    kwargs = notification_kwargs()
    first, second = children(kwargs, "hold"), children({**kwargs, "subject": "Second caller"})
    first.next()
    backend = second.next()["backend"]
    first.send("go")
    inserted = first.next()["inserted"]
    second.send("go")
    wait_for(lambda: waiting_on_a_lock(backend), timeout=20, what="second insert blocked on the first's key")
    first.send("commit")
    assert first.next() == {"finished": inserted, "outcome": "commit"}
    assert second.next() == {"conflict": ["subject"], "key": f"tests:{kwargs['notification_id']}:42"}
    assert list(Notification.objects.values_list("pk", "subject")) == [(inserted, "Your invoice")]


@pytest.mark.django_db(transaction=True)
def test_second_process_creates_the_key_when_the_first_rolls_back(children: Any) -> None:
    kwargs = notification_kwargs()
    first, second = children(kwargs, "hold"), children({**kwargs, "subject": "Second caller"})
    first.next()
    backend = second.next()["backend"]
    first.send("go")
    inserted = first.next()["inserted"]
    second.send("go")
    wait_for(
        lambda: waiting_on_a_lock(backend),
        timeout=20,
        what="second insert blocked on the first's key",
    )

    first.send("rollback")
    assert first.next() == {"finished": inserted, "outcome": "rollback"}
    created = second.next()["returned"]
    assert created != inserted
    assert list(Notification.objects.values_list("pk", "subject")) == [(created, "Second caller")]
    assert list(OutboxMessage.objects.values_list("notification_id", flat=True)) == [created]


@pytest.mark.django_db(transaction=True)
def test_processes_racing_for_one_key_get_one_row(children: Any) -> None:
    kwargs = notification_kwargs()
    racers = [children(kwargs) for i in range(6)]
    for racer in racers:
        racer.next()  # set up and connected: only the insert is left
    for racer in racers:
        racer.send("go")
    returned = {racer.next()["returned"] for racer in racers}
    assert len(returned) == 1
    [pk] = returned
    assert list(Notification.objects.values_list("pk", flat=True)) == [pk]
    assert list(OutboxMessage.objects.values_list("notification_id", flat=True)) == [pk]


@pytest.mark.django_db(transaction=True)
def test_processes_racing_with_different_content_get_one_row_and_conflicts(children: Any) -> None:
    kwargs = notification_kwargs()
    racers = [children({**kwargs, "subject": f"caller {i}"}) for i in range(3)]
    for racer in racers:
        racer.next()
    for racer in racers:
        racer.send("go")
    answers = [racer.next() for racer in racers]
    [winner] = [a["returned"] for a in answers if "returned" in a]
    assert sorted(a.get("conflict", []) for a in answers) == [[], ["subject"], ["subject"]]
    assert list(Notification.objects.values_list("pk", flat=True)) == [winner]
    assert list(OutboxMessage.objects.values_list("notification_id", flat=True)) == [winner]


# notify_many()


@pytest.mark.django_db(transaction=True)
def test_notify_many_writes_every_item_in_one_transaction() -> None:
    items = [notification_kwargs(user_id=i) for i in range(20)]
    result = notify_many(items)
    assert [n.key for n in result] == [f"tests:{item['notification_id']}:{i}" for i, item in enumerate(items)]
    assert Notification.objects.count() == OutboxMessage.objects.count() == 20
    # PostgreSQL's now() is the transaction's start time: one value means one transaction.
    assert Notification.objects.values("created_at").distinct().count() == 1
    assert OutboxMessage.objects.values("created_at").distinct().count() == 1


@pytest.mark.django_db
def test_notify_many_collapses_repeats_inside_and_across_calls() -> None:
    a, b, c = (notification_kwargs() for _ in range(3))
    first = notify_many([a, b, dict(a)])
    assert [n.pk for n in first] == [first[0].pk, first[1].pk, first[0].pk]
    assert first[2].subject == "Your invoice"
    assert Notification.objects.count() == OutboxMessage.objects.count() == 2

    second = notify_many(iter([c, b]))  # any iterable
    assert second[1].pk == first[1].pk and second[0].pk not in {first[0].pk, first[1].pk}
    assert notify(**a).pk == first[0].pk
    assert Notification.objects.count() == OutboxMessage.objects.count() == 3


@pytest.mark.django_db
def test_notify_many_of_nothing_writes_nothing() -> None:
    assert notify_many([]) == []
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_notify_many_names_the_bad_item_and_writes_nothing() -> None:
    items = [notification_kwargs() for _ in range(5)]
    items[3]["to"] = "ann.example.com"
    with pytest.raises(InvalidNotification) as caught:
        notify_many(items)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == "items[3].to"
    assert str(caught.value) == "items[3].to: 'ann.example.com' is not a valid email address"
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        pytest.param({"subject": "Hi\r\nBcc: x@y.com"}, "items[1].subject", id="header-injection"),
        pytest.param({"service": "a:b"}, "items[1].service", id="colon"),
        pytest.param({"metadata": []}, "items[1].metadata", id="metadata"),
    ],
)
def test_notify_many_error_names_index_and_field(bad: dict[str, Any], problem: str) -> None:
    items = [notification_kwargs(), notification_kwargs(**bad), notification_kwargs()]
    with pytest.raises(InvalidNotification) as caught:
        notify_many(items)
    assert caught.value.field == problem and str(caught.value).startswith(f"{problem}: ")
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_notify_many_item_missing_a_field_or_not_a_mapping() -> None:
    missing = notification_kwargs()
    del missing["body"]
    with pytest.raises(InvalidNotification) as caught:
        notify_many([notification_kwargs(), missing])
    assert caught.value.field == "items[1].body" and "required" in str(caught.value)

    with pytest.raises(InvalidNotification) as caught:
        notify_many([notification_kwargs(), notification_kwargs(), "ann@example.com"])  # type: ignore[list-item]
    assert caught.value.field == "items[2]" and "mapping" in str(caught.value)
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_notify_runs_as_a_prepared_statement_unless_turned_off(settings: Any) -> None:
    def prepared_inserts() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'WITH ins AS (INSERT%%'")
            return int(cursor.fetchone()[0])

    connection.close()  # a new session: nothing prepared yet
    first = notify(**notification_kwargs())
    second = notify(**notification_kwargs(metadata={"order": [1, "x"]}))
    assert prepared_inserts() == 1  # planned once, run twice
    assert second.metadata == {"order": [1, "x"]} and second.created_at.tzinfo is not None
    assert Notification.objects.filter(pk__in=[first.pk, second.pk]).count() == 2

    connection.close()
    settings.NOTIFICATIONS_PREPARED_STATEMENTS = False
    third = notify(**notification_kwargs())
    assert prepared_inserts() == 0 and Notification.objects.filter(pk=third.pk).exists()


# Manual transaction management: set_autocommit(False), no atomic block.


@pytest.fixture
def manual_transaction() -> Any:
    transaction.set_autocommit(False)
    yield
    if not transaction.get_autocommit():
        transaction.rollback()
        transaction.set_autocommit(True)


def committed_keys() -> list[str]:
    """The keys another session sees: committed ones only."""
    with psycopg.connect(database_url()) as other:
        return [row[0] for row in other.execute("SELECT key FROM notifications_notification ORDER BY key")]


@pytest.mark.django_db(transaction=True)
def test_manual_transaction_commit_queues_the_email_for_the_periodic_relay(manual_transaction: Any) -> None:
    """Finding: under set_autocommit(False) notify() inserted and then raised
    TransactionManagementError from transaction.on_commit. It writes in the caller's
    transaction now and leaves the wake-up to beat's periodic relay pass."""
    from notifications.relay import relay_batch
    from tests.conftest import take_delivery_payloads

    n = notify(**notification_kwargs())
    User.objects.create(username="in-the-same-transaction")
    assert committed_keys() == []  # not committed: the caller decides
    transaction.commit()
    transaction.set_autocommit(True)
    assert committed_keys() == [n.key]
    assert User.objects.filter(username="in-the-same-transaction").exists()
    take_delivery_payloads()  # what earlier tests left
    assert relay_batch() == 1  # beat's pass, after the commit
    assert [p["key"] for batch in take_delivery_payloads() for p in batch] == [n.key]


@pytest.mark.django_db(transaction=True)
def test_manual_transaction_rollback_leaves_nothing(manual_transaction: Any) -> None:
    kwargs = notification_kwargs()
    notify(**kwargs)
    notify_many([notification_kwargs(), notification_kwargs()])
    with pytest.raises(NotificationConflict):  # a savepoint: the transaction stays usable
        notify(**{**kwargs, "subject": "Other"})
    User.objects.create(username="rolled-back")
    transaction.rollback()
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()
    assert not User.objects.exists()


# notify_many(): conflicts, limits, lock order.


@pytest.mark.django_db(transaction=True)
def test_notify_many_same_key_twice_with_different_content_is_a_conflict() -> None:
    """Finding: within one notify_many() call the second of two items with one key was
    silently collapsed into the first, its content dropped."""
    a = notification_kwargs()
    items = [a, notification_kwargs(), {**a, "subject": "Other", "body": "Other"}]
    with pytest.raises(NotificationConflict) as caught:
        notify_many(items)
    error = caught.value
    assert (error.field, error.fields, error.key) == (
        "items[2].subject",
        ("subject", "body"),
        f"tests:{a['notification_id']}:42",
    )
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_notify_many_conflict_with_a_stored_key_writes_nothing_in_autocommit() -> None:
    """Outside a caller's transaction notify_many() runs in one of its own: the items
    before and after the conflicting one are not written either."""
    existing = notification_kwargs()
    kept = notify(**existing)
    items = [notification_kwargs(), {**existing, "to": "bob@example.com"}, notification_kwargs()]
    with pytest.raises(NotificationConflict) as caught:
        notify_many(items)
    assert caught.value.field == "items[1].to" and caught.value.key == kept.key
    assert keys() == [kept.key] and OutboxMessage.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_notify_many_bad_item_writes_nothing_when_the_database_refuses_it() -> None:
    """One transaction for the whole call, also in autocommit: a failure in the second
    insert statement takes the first one's rows with it."""
    from notifications.managers import INSERT_CHUNK

    items = [notification_kwargs(notification_id=f"n{i:05d}") for i in range(INSERT_CHUNK + 1)]
    existing = notify(**{**items[-1], "subject": "Stored first"})  # sorts last: in the second statement
    with pytest.raises(NotificationConflict):
        notify_many(items)
    assert keys() == [existing.key]


@pytest.fixture
def server_side_binding() -> Any:
    """The connection binds parameters on the server (the psycopg backend's
    ``server_side_binding`` option): then PostgreSQL counts them."""
    options = connection.settings_dict["OPTIONS"]
    connection.close()
    options["server_side_binding"] = True
    yield
    connection.close()
    options.pop("server_side_binding")


@pytest.mark.django_db(transaction=True)
def test_notify_many_stays_under_postgresqls_parameter_limit(server_side_binding: Any) -> None:
    """Finding: notify_many() put every item in one statement, 10 parameters each, so
    with server-side binding 6,554 items or more hit PostgreSQL's limit of 65535
    parameters per statement."""
    items = [notification_kwargs(notification_id=f"p{i}", user_id=i) for i in range(7000)]
    result = notify_many(items)
    assert [n.key for n in result] == [f"tests:p{i}:{i}" for i in range(7000)]
    assert Notification.objects.count() == OutboxMessage.objects.count() == 7000


@pytest.mark.django_db
def test_notify_many_refuses_more_items_than_the_limit(settings: Any) -> None:
    """Finding: notify_many() took any number of items in one call."""
    from notifications.conf import DEFAULTS

    assert DEFAULTS["MAX_BATCH_ITEMS"] == 10000
    settings.NOTIFICATIONS_MAX_BATCH_ITEMS = 3
    assert len(notify_many(notification_kwargs() for _ in range(3))) == 3

    def endless() -> Any:
        while True:
            yield notification_kwargs()

    with pytest.raises(InvalidNotification) as caught:
        notify_many(endless())  # refused at the fourth item, not read to the end
    assert caught.value.field == "items"
    assert str(caught.value) == "items: more than 3 items in one call (NOTIFICATIONS_MAX_BATCH_ITEMS); split them"
    assert Notification.objects.count() == 3


@pytest.mark.django_db(transaction=True)
def test_overlapping_notify_many_in_opposite_orders_do_not_deadlock() -> None:
    """Finding: notify_many() inserted in the caller's order, so two calls with the same
    keys in opposite orders took the unique index's locks in opposite orders and one of
    them died in a deadlock. Keys go in sorted order now.

    Made certain rather than likely: a third transaction holds the middle key, so both
    calls are mid-insert and waiting when it lets go."""
    items = [notification_kwargs(service="deadlock", notification_id=f"k{i}") for i in range(10)]
    hold, release = threading.Event(), threading.Event()
    backends: queue.Queue[int] = queue.Queue()
    go = threading.Barrier(3)
    results: dict[str, Any] = {}

    class Release(Exception):
        pass

    def holder() -> None:
        try:
            with transaction.atomic():
                notify(**items[5])
                hold.set()
                release.wait(30)
                raise Release
        except Release:
            pass
        finally:
            connection.close()

    def caller(name: str, order: list[dict[str, Any]]) -> None:
        try:
            connection.ensure_connection()
            backends.put(connection.connection.info.backend_pid)
            go.wait(30)
            results[name] = [n.pk for n in notify_many(order)]
        except Exception as exc:
            results[name] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert hold.wait(30)
    threads += [
        threading.Thread(target=caller, args=("forward", items)),
        threading.Thread(target=caller, args=("backward", items[::-1])),
    ]
    for thread in threads[1:]:
        thread.start()
    pids = [backends.get(timeout=30) for _ in range(2)]
    go.wait(30)
    wait_for(lambda: all(waiting_on_a_lock(pid) for pid in pids), what="both calls waiting on a key")
    release.set()
    for thread in threads:
        thread.join(60)
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert results["forward"] == results["backward"][::-1]
    assert Notification.objects.filter(service="deadlock").count() == OutboxMessage.objects.count() == 10


@pytest.mark.django_db
def test_notify_into_a_database_the_relay_does_not_publish_is_refused(settings):
    """Finding 4: ``notify(using=X)`` with X other than NOTIFICATIONS_DATABASE wrote rows
    that no relay pass ever published. It is refused, and nothing written, unless X is
    one of NOTIFICATIONS_RELAY_DATABASES."""
    from notifications import InvalidNotification
    from notifications.models import Notification

    kwargs = notification_kwargs()
    with pytest.raises(InvalidNotification) as refused:
        notify(**kwargs, using="elsewhere")
    assert refused.value.field == "using" and "NOTIFICATIONS_RELAY_DATABASES" in str(refused.value)
    assert not Notification.objects.filter(notification_id=kwargs["notification_id"]).exists()
    settings.NOTIFICATIONS_RELAY_DATABASES = ["default"]
    assert notify(**kwargs, using="default").pk
