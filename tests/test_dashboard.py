"""The on-call dashboard and the admin lists, server side: what each kind of user sees and
may do on the page, the lists' columns, and searches that an index answers (EXPLAIN on a
table of 20,000 analyzed rows). The browser's view of the same page: test_browser.py."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from notifications.models import Notification, OutboxMessage, SentEmail, Status
from tests.test_admin import CHANGELIST, logged_in, make, scheduled, shown, staff, state
from tests.test_health import kafka_server  # noqa: F401 (a fixture)
from tests.test_metrics import kafka_topics  # noqa: F401 (a fixture)

DASHBOARD = "admin:notifications_notification_dashboard"

pytestmark = pytest.mark.django_db


def page(client: Client, name: str = DASHBOARD, **query: str) -> str:
    response = client.get(reverse(name), query)
    assert response.status_code == 200
    return response.content.decode()


def bars(html: str) -> list[int]:
    """The counts the chart's bars carry, oldest minute first."""
    return [int(c) for c in re.findall(r'<rect class="bar"[^>]*data-count="(\d+)"', html)]


def pipeline() -> dict[str, Any]:
    """A pipeline with something in every section: two sent (3 and 5 minutes ago), two
    failed for one reason and one for another, a held ambiguous one, a claim whose lease
    ran out, and one waiting in the outbox."""
    now = timezone.now()
    sent = [make("sent", "sent") for _ in range(2)]
    for n, minutes in zip(sent, (3, 5), strict=True):
        Notification.objects.filter(pk=n.pk).update(
            sent_at=now - timedelta(minutes=minutes), created_at=now - timedelta(minutes=minutes, seconds=2)
        )
    failed = [make("failed", "failed") for _ in range(2)]
    other = make("failed", "failed")
    Notification.objects.filter(pk=other.pk).update(last_error="554 5.7.1 Rejected as spam")
    held = make("ambiguous", "held", subject="Your password was changed")
    stuck = make("sending", "claimed")
    SentEmail.objects.filter(key=stuck.key).update(
        owner="celery@worker-9", lease_expires_at=now - timedelta(seconds=90)
    )
    waiting = make("created")
    OutboxMessage.objects.filter(notification=waiting).update(published_at=None, created_at=now - timedelta(seconds=40))
    return {"sent": sent, "failed": failed, "other": other, "held": held, "stuck": stuck, "waiting": waiting}


# Who sees the page.


def test_anonymous_users_are_sent_to_login(client: Client) -> None:
    url = reverse(DASHBOARD)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={url}"


def test_staff_without_the_view_permission_get_403(django_user_model: Any) -> None:
    client = logged_in(staff(django_user_model, "clerk"))
    assert client.get(reverse(DASHBOARD)).status_code == 403


def test_the_changelist_and_the_app_page_link_to_the_dashboard(admin_client: Client) -> None:
    url = reverse(DASHBOARD)
    assert f'href="{url}"' in page(admin_client, CHANGELIST)
    response = admin_client.get(reverse("admin:app_list", args=["notifications"]))
    assert f'href="{url}"' in response.content.decode()


# What it shows.


def test_the_dashboard_shows_every_figure_for_a_superuser(admin_client: Client) -> None:
    made = pipeline()
    html = page(admin_client)
    for label, count in (("sent", 2), ("failed", 3), ("ambiguous (held)", 1), ("sending", 1), ("created", 1)):
        assert f'data-status="{label}" data-count="{count}"' in html, label
    assert 'data-status="total" data-count="8"' in html
    assert (
        'id="backlog-due" href="/admin/notifications/outboxmessage/?published_at__isnull=True" data-count="1"' in html
    )
    # 40 s old, as of the transaction's start (PostgreSQL's now() in this test)
    assert re.search(r'id="backlog-oldest"><div class="figure">[34]\d s<', html)
    assert 'id="lag-count" data-count="2"' in html
    assert '<div class="figure">2.0 s</div><div class="label">max</div>' in html
    counts = bars(html)
    assert len(counts) == 60 and sum(counts) == 2 and counts.count(1) == 2
    assert counts[-4] == 1 and counts[-6] == 1  # 3 and 5 minutes ago, the current minute last
    # Failures by reason, the commonest first, each linking to its list.
    assert html.index("550 5.1.1 No such user") < html.index("554 5.7.1 Rejected as spam")
    assert "?status__exact=failed&amp;last_error=550+5.1.1+No+such+user" in html
    held = made["held"]
    assert f'id="held-{held.pk}"' in html and "Your password was changed" in html
    assert 'value="resend_ambiguous"' in html and 'value="mark_ambiguous_sent"' in html
    assert "csrfmiddlewaretoken" in html
    assert made["stuck"].key in html and "celery@worker-9" in html
    assert re.search(r"1 min 3\d s", html)  # its lease ran out 90 s ago
    assert '<meta http-equiv="refresh" content="15">' in html


def test_an_empty_pipeline_shows_zeros_and_dashes(admin_client: Client) -> None:
    html = page(admin_client)
    assert 'data-status="total" data-count="0"' in html
    assert bars(html) == [0] * 60
    assert "No failed notifications." in html and "None held." in html
    assert '<div class="figure">—</div><div class="label">p99</div>' in html
    assert 'id="scheduled-waiting" data-count="0"' in html
    assert re.search(
        r'id="scheduled-next">\s*<div class="figure">—</div>\s*<div class="label">the next falls due</div>', html
    )


def test_the_dashboard_shows_what_waits_for_later_and_the_new_states(admin_client: Client) -> None:
    from notifications import cancel

    now = timezone.now()
    first = scheduled(send_at=now + timedelta(minutes=20), priority="high")
    scheduled(send_at=now + timedelta(hours=3))
    assert cancel(scheduled().key).in_time
    make("expired", "expired")
    html = page(admin_client)
    for label, count in (("scheduled", 2), ("expired", 1), ("cancelled", 1)):
        assert f'data-status="{label}" data-count="{count}"' in html, label
    assert 'href="/admin/notifications/notification/?status__exact=cancelled"' in html
    assert 'id="scheduled-waiting" data-count="2"' in html
    assert 'id="scheduled-high" data-count="1"' in html and 'id="scheduled-normal" data-count="1"' in html
    next_due = timezone.localtime(first.send_at).strftime("%Y-%m-%d %H:%M:%S")
    assert re.search(
        rf'id="scheduled-next" data-due="[^"]+">\s*<div class="figure">{next_due}</div>\s*'
        r'<div class="label">the next falls due, in (19|20) min \d\d s</div>',  # from the transaction's start
        html,
    )


@pytest.fixture
def one_high_priority_message() -> Any:
    """One message waiting in the high-priority delivery queue (no worker runs here),
    purged afterwards."""
    from celery import current_app

    from notifications import broker, exposition
    from notifications.conf import settings as conf
    from tests.conftest import wait_for

    with current_app.connection_for_write() as conn:
        for declared in broker.queues():
            declared(conn.default_channel).declare()
        conn.default_channel.queue_purge(conf.HIGH_QUEUE)
        conn.Producer().publish({"probe": True}, exchange=conf.EXCHANGE, routing_key=conf.HIGH_QUEUE)
        wait_for(lambda: (exposition.broker_queues() or {}).get("deliver_high", ("", 0, 0))[1] == 1, what="queued")
        try:
            yield conf.HIGH_QUEUE
        finally:
            conn.default_channel.queue_purge(conf.HIGH_QUEUE)


def test_the_dashboard_shows_both_delivery_queues(admin_client: Client, one_high_priority_message: str) -> None:
    html = page(admin_client)
    high = re.search(
        r'<tr id="queue-deliver_high"><td>([^<]+)</td>.*?data-ready="(\d+)".*?data-consumers="(\d+)"', html, re.S
    )
    assert high and high.groups() == (one_high_priority_message, "1", "0")
    normal = re.search(r'<tr id="queue-deliver"><td>([^<]+)</td>.*?data-ready="(\d+)"', html, re.S)
    assert normal and normal[1] == "notifications.deliver"
    assert 'class="number warn" data-consumers="0"' in html  # no worker consumes the deliveries


def test_a_broker_that_does_not_answer_costs_the_dashboard_its_deadline(admin_client: Client, monkeypatch: Any) -> None:
    import functools
    import socket
    import time

    from notifications import exposition

    silent = socket.socket()  # accepts connections, never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}//"
    monkeypatch.setattr(exposition, "broker_queues", functools.partial(exposition.broker_queues, url=url))
    try:
        started = time.monotonic()
        html = page(admin_client)
        assert time.monotonic() - started < exposition.BROKER_TIMEOUT + 3
    finally:
        silent.close()
    assert 'id="broker-away"' in html and "The broker did not answer within 2.0 s." in html
    assert 'id="scheduled-waiting" data-count="0"' in html  # the database's figures are all there


def test_the_refresh_can_be_stopped(admin_client: Client) -> None:
    assert 'http-equiv="refresh"' not in page(admin_client, refresh="0")
    assert '<meta http-equiv="refresh" content="30">' in page(admin_client, refresh="30")


def test_a_failure_reason_links_to_the_list_of_that_reason(admin_client: Client) -> None:
    made = pipeline()
    keys = shown(admin_client, status__exact="failed", last_error="550 5.1.1 No such user")
    assert keys == sorted(n.key for n in made["failed"])
    assert shown(admin_client, status__exact="failed", last_error="554 5.7.1 Rejected as spam") == [made["other"].key]


# Its actions, and who may run them.


def test_resend_from_the_dashboard_queues_the_held_notification_again(django_user_model: Any) -> None:
    made = pipeline()
    held = made["held"]
    client = logged_in(staff(django_user_model, "resolver", "view_notification", "resolve_ambiguous"))
    response = client.post(reverse(DASHBOARD), {"action": "resend_ambiguous", "_selected_action": [held.pk]})
    assert response.status_code == 302 and response["Location"] == reverse(DASHBOARD)
    assert state(held) == ("created", "released", 2)
    after = client.get(reverse(DASHBOARD))
    assert [str(m) for m in after.context["messages"]] == ["1 ambiguous notification(s) queued for resending."]
    assert "None held." in after.content.decode()


def test_mark_sent_from_the_dashboard_closes_it_without_a_send(admin_client: Client) -> None:
    held = pipeline()["held"]
    response = admin_client.post(reverse(DASHBOARD), {"action": "mark_ambiguous_sent", "_selected_action": [held.pk]})
    assert response.status_code == 302
    assert state(held) == ("sent", "sent", 1)


@pytest.mark.parametrize(
    "permissions",
    [("view_notification",), ("view_notification", "change_notification")],
    ids=["view-only", "view-and-change"],
)
def test_without_resolve_ambiguous_the_page_has_no_buttons_and_refuses_their_post(
    django_user_model: Any, permissions: tuple[str, ...]
) -> None:
    made = pipeline()
    held = made["held"]
    client = logged_in(staff(django_user_model, "viewer", *permissions))
    html = page(client)
    assert f'id="held-{held.pk}"' in html  # seen
    assert "<form" not in html.split('id="held"')[1] and "resend_ambiguous" not in html
    assert "Deciding needs the permission" in html
    for action in ("resend_ambiguous", "mark_ambiguous_sent", "retry_failed", "delete_selected"):
        response = client.post(reverse(DASHBOARD), {"action": action, "_selected_action": [held.pk, made["other"].pk]})
        assert response.status_code == 403, action
    assert state(held) == ("ambiguous", "held", 1)
    assert state(made["other"]) == ("failed", "failed", 1)


def test_a_post_naming_no_notification_changes_nothing(admin_client: Client) -> None:
    held = pipeline()["held"]
    for ids in (["²"], ["x"], []):
        response = admin_client.post(reverse(DASHBOARD), {"action": "resend_ambiguous", "_selected_action": ids})
        assert response.status_code == 302
    assert state(held) == ("ambiguous", "held", 1)
    assert admin_client.get(reverse(DASHBOARD), {"refresh": "¹"}).status_code == 200


def test_a_post_without_the_csrf_token_is_refused(django_user_model: Any) -> None:
    held = pipeline()["held"]
    user = staff(django_user_model, "resolver", "view_notification", "resolve_ambiguous")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(reverse(DASHBOARD), {"action": "resend_ambiguous", "_selected_action": [held.pk]})
    assert response.status_code == 403
    assert state(held) == ("ambiguous", "held", 1)


# The lists.


def test_the_notification_list_shows_subject_last_error_and_times_to_the_second(admin_client: Client) -> None:
    subject = "Your invoice for March is ready, with a long subject line to cut"
    n = make("failed", "failed", subject=subject)
    created = timezone.localtime(Notification.objects.get(pk=n.pk).created_at)
    html = page(admin_client, CHANGELIST)
    assert f'<span title="{subject}">{subject[:49]}…</span>' in html
    assert "550 5.1.1 No such user" in html
    assert created.strftime("%Y-%m-%d %H:%M:%S") in html
    assert "1 notification" in html


def test_the_sent_email_and_outbox_lists_show_replies_and_times_to_the_second(admin_client: Client) -> None:
    n = make("failed", "failed")
    published = timezone.localtime(OutboxMessage.objects.get(notification=n).published_at)
    outbox = page(admin_client, "admin:notifications_outboxmessage_changelist")
    assert "Your invoice" in outbox and published.strftime("%Y-%m-%d %H:%M:%S") in outbox
    sent = page(admin_client, "admin:notifications_sentemail_changelist")
    assert "550 5.1.1 No such user" in sent


def test_a_list_counts_up_to_its_limit_then_says_more_than(admin_client: Client, monkeypatch: Any) -> None:
    monkeypatch.setattr("notifications.admin.COUNT_LIMIT", 3)
    for _ in range(5):
        make("sent", "sent")
    make("failed", "failed")
    make("failed", "failed")
    assert "more than 3 notifications" in page(admin_client, CHANGELIST)
    searched = page(admin_client, CHANGELIST, q="tests:")
    assert "more than 3 results" in searched and "more than 3 notifications" in searched
    assert "Show counts" not in searched  # no facets: a count per filter choice reads every row
    assert "2 notifications" in page(admin_client, CHANGELIST, status__exact="failed")


def test_search_matches_beginnings_and_ends_not_middles(admin_client: Client) -> None:
    ann = make("sent", "sent", service="billing", notification_id="inv-2024-0042", user_id="u-7")
    make("sent", "sent", service="shipping", notification_id="parcel-9", user_id="u-8", to="bob@example.org")
    assert shown(admin_client, q="billing:") == [ann.key]
    assert shown(admin_client, q="billing:inv-2024") == [ann.key]
    assert shown(admin_client, q="inv-2024-0042") == [ann.key]  # a whole notification_id
    assert shown(admin_client, q="u-7") == [ann.key]
    assert shown(admin_client, q="ANN@Example.com") == [ann.key]
    assert shown(admin_client, q="2024") == []  # the middle of a key is not searched
    assert shown(admin_client, q="example") == []  # nor the middle of an address
    assert shown(admin_client, q="u-") == []  # a user_id is whole
    assert shown(admin_client, q="billing:inv_2024%") == []  # LIKE's wildcards are matched as they are


def test_the_service_filter_lists_every_service(admin_client: Client) -> None:
    for service in ("billing", "shipping", "accounts", "billing"):
        make("sent", "sent", service=service)
    response = admin_client.get(reverse(CHANGELIST))
    [service_filter] = [f for f in response.context["cl"].filter_specs if getattr(f, "field_path", "") == "service"]
    assert list(service_filter.lookup_choices) == ["accounts", "billing", "shipping"]


# The searches an index answers.

SERVICES = ("billing", "shipping", "accounts", "auth", "news")
ROWS = 20_000


def key_of(g: int) -> str:
    return f"{SERVICES[g % 5]}:n{g}:u{g % 5000}"


def to_of(g: int) -> str:
    return f"user{g}@example{g % 7}.com"


@pytest.fixture
def many_rows() -> None:
    """20,000 notifications (and their sent-email records) in five services, analyzed,
    so that the planner costs the plans as on a real table."""
    services = ", ".join(f"'{s}'" for s in SERVICES)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO notifications_notification (key, service, notification_id, user_id, "to", subject, body,
                                                    from_email, html_body, metadata, status, sent_at)
            SELECT s || ':n' || g || ':u' || (g % 5000), s, 'n' || g, 'u' || (g % 5000),
                   'user' || g || '@example' || (g % 7) || '.com', 'Subject ' || g, 'Body',
                   '', '', '{{}}'::jsonb, 'sent', now() - make_interval(secs => g * 130)
            FROM (SELECT g, (ARRAY[{services}])[1 + g % 5] AS s FROM generate_series(1, {ROWS}) AS g) AS rows_
            """
        )
        cursor.execute(
            "INSERT INTO notifications_sentemail (key, notification_id, state, token, owner, attempts, "
            "ambiguous_count, message_id, response) SELECT key, id, 'sent', 1, '', 1, 0, "
            "'<' || md5(key) || '@notifications.local>', '250 Ok' FROM notifications_notification"
        )
        cursor.execute(
            "INSERT INTO notifications_outboxmessage (notification_id, created_at, published_at) "
            "SELECT id, created_at, now() FROM notifications_notification"
        )
        cursor.execute("ANALYZE notifications_notification")
        cursor.execute("ANALYZE notifications_sentemail")
        cursor.execute("ANALYZE notifications_outboxmessage")


def page_plans(client: Client, name: str, table: str, **query: str) -> tuple[list[str], list[str]]:
    """The plans (EXPLAIN) of every query on ``table`` the list page ran, and the keys shown."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(reverse(name), query)
    assert response.status_code == 200
    plans = []
    with connection.cursor() as cursor:
        for sql in (str(q["sql"]) for q in captured.captured_queries):
            if f'"{table}"' in sql and sql.lstrip("( ").upper().startswith(("SELECT", "WITH")):
                cursor.execute(f"EXPLAIN {sql}")
                plans.append("\n".join(row[0] for row in cursor.fetchall()))
    return plans, [o.key for o in response.context["cl"].result_list]


def assert_indexed(plans: list[str], table: str, indexes: list[str], narrow: bool = True) -> None:
    """No plan reads the whole table; ``narrow``: nor walks it in id order (the planner's
    right choice only for a search matching a good part of the table, where the page's
    LIMIT stops the walk early)."""
    assert plans
    for text in plans:
        assert f"Seq Scan on {table}" not in text, text
        if narrow:
            assert f"using {table}_pkey" not in text, text
    for index in indexes:
        assert any(index in text for text in plans), (index, plans)


@pytest.mark.parametrize(
    ("q", "index"),
    [
        (key_of(1001), "notifications_key_prefix_idx"),
        (key_of(1234).rsplit(":", 1)[0], "notifications_key_prefix_idx"),
        ("n4321", "notifications_key_prefix_idx"),
        ("u4242", "notifications_user_idx"),
        ("USER777@example0.com", "notifications_to_suffix_idx"),
        ("example3.com", "notifications_to_suffix_idx"),  # a seventh of the table
    ],
    ids=["whole-key", "key-prefix", "notification-id", "user-id", "recipient", "domain"],
)
def test_notification_searches_read_indexes_not_the_table(
    many_rows: None, admin_client: Client, q: str, index: str
) -> None:
    table = "notifications_notification"
    plans, keys = page_plans(admin_client, CHANGELIST, table, q=q)
    term = q.lower()
    expected = [
        key_of(g)
        for g in range(ROWS, 0, -1)
        if key_of(g).startswith(q) or key_of(g).split(":")[1] == q or f"u{g % 5000}" == q or to_of(g).endswith(term)
    ]
    assert keys == expected[:100] and keys
    assert_indexed(plans, table, [index], narrow=len(expected) < 100)


def test_the_unfiltered_list_and_the_service_filter_read_no_whole_table(many_rows: None, admin_client: Client) -> None:
    table = "notifications_notification"
    for query in ({}, {"status__exact": "failed"}):
        plans, keys = page_plans(admin_client, CHANGELIST, table, **query)
        for text in plans:
            assert f"Seq Scan on {table}" not in text, (query, text)
    plans, _ = page_plans(admin_client, CHANGELIST, table)
    assert any("notifications_service_idx" in text for text in plans)  # the filter's choices


def test_sent_email_search_by_key_or_message_id_reads_indexes(many_rows: None, admin_client: Client) -> None:
    table = "notifications_sentemail"
    key = key_of(500)
    message_id = SentEmail.objects.get(key=key).message_id
    for q, index in (
        (message_id, "notifications_sent_msgid_idx"),
        (message_id.strip("<>"), "notifications_sent_msgid_idx"),
        (key, "notifications_sentemail_key_uniq"),
    ):
        plans, keys = page_plans(admin_client, "admin:notifications_sentemail_changelist", table, q=q)
        assert keys == [key]
        assert_indexed(plans, table, [index])


def test_the_dashboard_reads_no_whole_table(many_rows: None, admin_client: Client) -> None:
    """Every query but the counts by status reads an index; those are bounded by their
    LIMIT (test_counts_by_status_stop_at_their_limit)."""
    pipeline()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    with CaptureQueriesContext(connection) as captured:
        assert admin_client.get(reverse(DASHBOARD)).status_code == 200
    with connection.cursor() as cursor:
        for sql in (str(q["sql"]) for q in captured.captured_queries):
            if " LIMIT 100001) AS x)" in sql:
                continue
            if "notifications_" in sql and sql.lstrip("( ").upper().startswith(("SELECT", "WITH")):
                cursor.execute(f"EXPLAIN {sql}")
                text = "\n".join(row[0] for row in cursor.fetchall())
                assert "Seq Scan on notifications_" not in text, (sql, text)


def test_counts_by_status_stop_at_their_limit(many_rows: None) -> None:
    """Past the limit a status gets PostgreSQL's estimate (marked on the page); below it
    the count is exact."""
    from notifications import status

    made = pipeline()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE notifications_notification")
    counted = status.counts_by_status_bounded(exact_up_to=1000)
    exact = status.counts_by_status()
    assert counted.estimated == ["sent"] and exact["sent"] == ROWS + len(made["sent"])
    assert abs(counted.counts["sent"] - exact["sent"]) < exact["sent"] * 0.05
    assert {k: v for k, v in counted.counts.items() if k != "sent"} == {k: v for k, v in exact.items() if k != "sent"}
    sql = _captured(lambda: status.counts_by_status_bounded(exact_up_to=1000))[0]
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}")
        text = "\n".join(row[0] for row in cursor.fetchall())
    # Each status's scan sits under its LIMIT; the rare ones read the status index.
    assert text.count("Limit") == len(Status) and "notifications_status_idx" in text


def test_the_dashboard_marks_estimated_counts(many_rows: None, admin_client: Client, monkeypatch: Any) -> None:
    monkeypatch.setattr("notifications.dashboard.EXACT_COUNTS_UP_TO", 1000)
    make("failed", "failed")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE notifications_notification")
    html = page(admin_client)
    sent = re.search(r'data-status="sent" data-count="(\d+)" data-estimated>\s*<div class="figure">≈ ([\d,]+)<', html)
    assert sent and abs(int(sent[1]) - ROWS) < ROWS * 0.05 and sent[2] == f"{int(sent[1]):,}"
    assert 'data-status="failed" data-count="1">' in html
    assert "more than 1,000, so PostgreSQL's estimate" in html


def test_the_priority_filter_reads_its_index(many_rows: None, admin_client: Client) -> None:
    table = "notifications_notification"
    Notification.objects.filter(id__in=Notification.objects.order_by("id").values("id")[:30]).update(priority="high")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE notifications_notification")
    plans, keys = page_plans(admin_client, CHANGELIST, table, priority__exact="high")
    assert len(keys) == 30 and set(Notification.objects.filter(key__in=keys).values_list("priority", flat=True)) == {
        "high"
    }
    assert_indexed(plans, table, ["notifications_priority_idx"])


def test_the_scheduled_figures_read_the_pending_outbox_index(many_rows: None) -> None:
    """2,000 rows due later beside 20,000 published ones: one range of the pending-rows
    index per priority, never the outbox table."""
    from notifications import status

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO notifications_outboxmessage (notification_id, created_at, due_at, priority) "
            "SELECT id, now(), now() + make_interval(secs => id), CASE WHEN id % 10 = 0 THEN 'high' ELSE 'normal' END "
            "FROM notifications_notification ORDER BY id LIMIT 2000"
        )
        cursor.execute("ANALYZE notifications_outboxmessage")
    later = status.scheduled()
    assert later.waiting == 2000 and later.by_priority == {"normal": 1800, "high": 200}
    (sql,) = _captured(status.scheduled)
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}")
        text = "\n".join(row[0] for row in cursor.fetchall())
    # Each priority reads an index of the unpublished rows only: the pending-rows index,
    # or (for the commoner priority, if the planner prefers) the published_at index's NULLs.
    assert "Seq Scan" not in text and "notifications_outbox_due" in text, text
    assert text.count("Index Only Scan using notifications_outbox_due") + text.count(
        "Index Cond: (published_at IS NULL)"
    ) == len(later.by_priority), text


def test_the_service_filter_reads_the_service_index(many_rows: None) -> None:
    from notifications import status

    assert status.services() == sorted(SERVICES)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + _captured(status.services)[-1])
        text = "\n".join(row[0] for row in cursor.fetchall())
    assert "Seq Scan" not in text and "notifications_service_idx" in text


def _captured(run: Any) -> list[str]:
    """The SQL statements ``run()`` sent, as PostgreSQL received them."""
    with CaptureQueriesContext(connection) as queries:
        run()
    return [str(q["sql"]) for q in queries.captured_queries]


def test_with_kafka_the_dashboard_lists_the_delivery_topics_lag(
    admin_client: Client,
    kafka_topics: tuple[str, str],  # noqa: F811 (the fixture)
) -> None:
    from confluent_kafka import Producer

    from notifications import kafka
    from notifications.conf import settings as conf
    from tests.conftest import wait_for

    high, normal = kafka_topics
    producer = Producer({"bootstrap.servers": conf.KAFKA_BOOTSTRAP_SERVERS})
    for _ in range(3):
        producer.produce(high, value=b"{}")
    assert producer.flush(15) == 0
    wait_for(lambda: kafka.lag_by_topic().get(high) == 2, timeout=20, what=kafka.lag_by_topic)

    html = page(admin_client)
    row = re.search(
        r'<tr id="queue-deliver_high"><td>([^<]+)</td>.*?data-ready="(\d+)".*?data-consumers="(\d+)"', html, re.S
    )
    assert row and row.groups() == (high, "2", "0")
    assert re.search(r'<tr id="queue-deliver"><td>' + re.escape(normal) + "</td>", html)
    assert 'id="queue-relay"' in html and 'id="queue-dead_letter"' not in html
    assert 'id="kafka-lag"' in html and "consumer group's lag" in html
