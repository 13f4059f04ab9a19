"""The dev stack's RabbitMQ setup against the real broker: its own vhost, made with
``rabbitmqctl`` or through the management API, and the API URL Flower is given."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection

from project import devbroker


@pytest.fixture
def vhost_url() -> Iterator[str]:
    url = devbroker.DEFAULT_URL + f"notifications-test-dev-{uuid.uuid4().hex[:8]}"
    yield url
    devbroker.delete_vhost(url)


def connects(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=0)
        return True
    except Exception:
        return False


def test_the_dev_stack_has_its_own_vhost_unless_the_environment_names_one() -> None:
    assert devbroker.dev_url({}) == ("amqp://guest:guest@127.0.0.1:5672/notifications-dev", True)
    given = "amqp://u:p@rabbit.internal:5672/mine"
    assert devbroker.dev_url({"CELERY_BROKER_URL": given}) == (given, False)


def test_vhost_and_management_api_from_a_broker_url() -> None:
    assert devbroker.vhost_of("amqp://guest:guest@127.0.0.1:5672//") == "/"
    assert devbroker.vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert devbroker.vhost_of("amqp://guest:guest@127.0.0.1:5672/a%2Fb") == "a/b"
    assert devbroker.api_url("amqp://us%40r:p%3Ass@rabbit:5672/vh") == "http://us%40r:p%3Ass@rabbit:15672/api/"
    assert devbroker.api_url("amqp://127.0.0.1//") == "http://guest:guest@127.0.0.1:15672/api/"
    assert devbroker.is_local("amqp://localhost//") and devbroker.is_local("amqp://[::1]:5672//")
    assert not devbroker.is_local("amqp://rabbit.internal:5672//")


def test_ensure_vhost_creates_it_once_with_rabbitmqctl(vhost_url: str) -> None:
    assert not connects(vhost_url)

    assert devbroker.ensure_vhost(vhost_url) is True
    assert connects(vhost_url)
    assert devbroker.ensure_vhost(vhost_url) is False  # there already: not ours to delete later

    assert devbroker.delete_vhost(vhost_url) is True
    assert not connects(vhost_url)


def test_without_rabbitmqctl_the_management_api_makes_the_vhost(
    vhost_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    if not devbroker.management_answers(vhost_url):
        pytest.skip("RabbitMQ's management plugin is not enabled on this machine (make run enables it)")
    monkeypatch.setenv("PATH", str(tmp_path))  # no rabbitmqctl to be found

    assert devbroker.ensure_vhost(vhost_url) is True
    assert connects(vhost_url)
    assert devbroker.delete_vhost(vhost_url) is True
    assert not connects(vhost_url)
