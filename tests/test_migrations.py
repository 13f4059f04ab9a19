"""Migrations: they match the models, build the named constraints the pipeline relies on,
and apply to (and reverse from) an empty database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from io import StringIO

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection

from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.django_db


def test_models_and_migrations_agree() -> None:
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)  # exits 1 on changes
    assert "No changes detected" in out.getvalue()


def test_the_unique_keys_and_named_indexes_exist() -> None:
    with connection.cursor() as cursor:
        notification = connection.introspection.get_constraints(cursor, "notifications_notification")
        outbox = connection.introspection.get_constraints(cursor, "notifications_outboxmessage")
        sent = connection.introspection.get_constraints(cursor, "notifications_sentemail")
    assert notification["notifications_notification_key_uniq"]["unique"]
    assert notification["notifications_notification_key_uniq"]["columns"] == ["key"]
    assert sent["notifications_sentemail_key_uniq"]["unique"]
    assert sent["notifications_sentemail_key_uniq"]["columns"] == ["key"]
    for name in ("notifications_status_idx", "notifications_service_idx", "notifications_user_idx"):
        assert notification[name]["index"], name
    assert outbox["notifications_outbox_due"]["index"]
    assert outbox["notifications_outbox_due"]["columns"] == ["priority", "due_at", "id"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'notifications_outbox_due'")
        [(definition,)] = cursor.fetchall()
    assert "WHERE (published_at IS NULL)" in definition  # partial: only unpublished rows


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"test_migrations_{uuid.uuid4().hex[:10]}"
    admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_apply_and_reverse_on_an_empty_database(empty_database: str) -> None:
    env = child_env(DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{empty_database}")

    def manage(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def tables() -> set[str]:
        url = f"postgresql://postgres@127.0.0.1:5432/{empty_database}"
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'notifications_%'").fetchall()
        return {r[0] for r in rows}

    assert "Applying notifications.0001_initial... OK" in manage("migrate", "--no-input")
    assert tables() == {
        "notifications_notification",
        "notifications_outboxmessage",
        "notifications_sentemail",
        "notifications_emailtemplate",
        "notifications_ratebucket",
        "notifications_streamdelivery",
    }
    manage("migrate", "notifications", "zero", "--no-input")
    assert tables() == set()
    manage("migrate", "notifications", "--no-input")
    assert len(tables()) == 6
