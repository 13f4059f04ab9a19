"""Another Django service with its own database: its notify() and relay publish, and the
notification service's worker records the notification by key and delivers it once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from notifications.models import Notification, SentEmail
from tests.conftest import ROOT, child_env, unique, wait_for
from tests.settings import OTHER_DB

pytestmark = pytest.mark.django_db(transaction=True)


def _admin(sql: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(sql)


def run_in_other_service(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE="tests.other_service_settings"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def other_service_db() -> Iterator[str]:
    _admin(f'DROP DATABASE IF EXISTS "{OTHER_DB}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{OTHER_DB}"')
    run_in_other_service("migrate", "--noinput")
    yield OTHER_DB
    _admin(f'DROP DATABASE IF EXISTS "{OTHER_DB}" WITH (FORCE)')


def test_other_service_notify_is_delivered_and_recorded_here(other_service_db, smtp_server, workers):
    workers.start()
    notification_id = unique("order")
    key = f"shop:{notification_id}:7"
    out = run_in_other_service(
        "shell",
        "-c",
        "from django.db import transaction\n"
        "from notifications import notify\n"
        "with transaction.atomic():\n"
        f"    n = notify(service='shop', notification_id='{notification_id}', user_id=7,\n"
        "               to='Bob <bob@example.com>', subject='Order shipped', body='On its way',\n"
        "               metadata={'order': 17})\n"
        "print('KEY', n.key)\n",
    )
    assert f"KEY {key}" in out
    run_in_other_service("relay")  # the caller's relay (its beat, in production)

    [received] = smtp_server.wait_received(key)
    assert received.to == ["bob@example.com"] and received.message["Subject"] == "Order shipped"
    here = wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), timeout=30)
    assert here.service == "shop" and here.user_id == "7" and here.metadata == {"order": 17}
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={other_service_db}") as conn:
        created = conn.execute("SELECT created_at FROM notifications_notification WHERE key = %s", [key]).fetchone()[0]
    assert here.created_at == created  # the creation time travels with the message
    assert SentEmail.objects.get(key=key).state == "sent"

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={other_service_db}") as conn:
        status, published = conn.execute(
            "SELECT status, published_at IS NOT NULL FROM notifications_notification WHERE key = %s", [key]
        ).fetchone()
        assert (status, published) == ("published", True)
        assert conn.execute("SELECT count(*) FROM notifications_sentemail").fetchone()[0] == 0

    # A second relay pass or a repeat notify() in the other service sends nothing more.
    run_in_other_service("relay")
    run_in_other_service(
        "shell",
        "-c",
        f"from notifications import notify; notify(service='shop', notification_id='{notification_id}', "
        "user_id=7, to='Bob <bob@example.com>', subject='Order shipped', body='On its way', metadata={'order': 17})",
    )
    run_in_other_service("relay")
    assert Notification.objects.filter(key=key).count() == 1
    assert smtp_server.count(key) == 1


def test_a_relay_loop_here_is_not_taken_for_the_other_services(other_service_db):
    """Finding 4: the loop's heartbeat was named by the relay queue alone, so a second
    service keeping the default queue name saw this one's heartbeat and its relay task
    returned 0 for ever. Wake-ups and heartbeat are this service's databases' own."""
    from notifications import relay

    loop = relay.start_loop()
    try:
        wait_for(relay.loop_alive, what="this service's loop heartbeat")
        out = run_in_other_service("shell", "-c", "from notifications import relay; print('ALIVE', relay.loop_alive())")
        assert "ALIVE False" in out
    finally:
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=20)


def test_other_services_own_template_files_render_there_and_arrive(other_service_db, smtp_server, workers):
    """The caller renders its own files (its TEMPLATES setting); the notification service
    has no such template, and needs none: the message carries the rendered email."""
    from notifications import InvalidNotification
    from notifications.rendering import render

    with pytest.raises(InvalidNotification, match="does not exist"):
        render("shop/shipped", {}, "", "default")  # not a template of this service
    workers.start()
    notification_id = unique("shipped")
    key = f"shop:{notification_id}:8"
    out = run_in_other_service(
        "shell",
        "-c",
        "from notifications import notify\n"
        f"n = notify(service='shop', notification_id='{notification_id}', user_id=8, to='cy@example.com',\n"
        "           template='shop/shipped', context={'order': 'A-17', 'name': 'Cy & <Co>'})\n"
        "print('KEY', n.key, n.template)\n",
    )
    assert f"KEY {key} shop/shipped" in out
    run_in_other_service("relay")

    [received] = smtp_server.wait_received(key)
    assert received.message["Subject"] == "Order A-17 shipped"
    assert received.message.get_body(("plain",)).get_content().strip() == "Hello Cy & <Co>, order A-17 is on its way."
    html = received.message.get_body(("html",)).get_content().strip()
    assert html == "<p>Hello Cy &amp; &lt;Co&gt;, order <b>A-17</b> is on its way.</p>"
    here = wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), timeout=30)
    assert (here.template, here.subject) == ("shop/shipped", "Order A-17 shipped")
