"""System checks: each unsafe setting is refused with the check's id and what to set,
by ``manage.py check`` and by real worker and beat processes, which must not start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any, cast

import pytest
from django.core.checks import Error
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from notifications.checks import check_pipeline
from tests.conftest import ROOT, child_env

_MISSING = object()


@pytest.fixture
def celery_conf() -> Iterator[Callable[..., None]]:
    """Change ``celery.current_app.conf`` for one test; the original values come back after."""
    from celery import current_app

    conf = current_app.conf
    changes = cast(dict[str, Any], conf.changes)  # the values set on top of the defaults
    saved: dict[str, Any] = {}

    def change(**values: Any) -> None:
        for name, value in values.items():
            saved.setdefault(name, changes.get(name, _MISSING))
            setattr(conf, name, value)

    yield change
    for name, value in saved.items():
        if value is _MISSING:
            changes.pop(name, None)
        else:
            changes[name] = value


def fired(errors: list[Error]) -> list[str]:
    return sorted(str(e.id) for e in errors)


def only(check_id: str) -> Error:
    errors = check_pipeline()
    assert fired(errors) == [f"notifications.{check_id}"], [f"{e.id}: {e.msg}" for e in errors]
    [error] = errors
    assert error.is_serious()
    return error


def test_the_projects_settings_pass() -> None:
    assert check_pipeline() == []
    out = StringIO()
    call_command("check", stdout=out)
    assert "System check identified no issues" in out.getvalue()


@pytest.mark.parametrize(
    ("celery", "check_id", "hint"),
    [
        pytest.param(
            {"broker_transport_options": {}},
            "E001",
            "CELERY_BROKER_TRANSPORT_OPTIONS = {'confirm_publish': True}",
            id="no-confirms",
        ),
        pytest.param(
            {"broker_transport_options": {"confirm_publish": False}},
            "E001",
            "CELERY_BROKER_TRANSPORT_OPTIONS = {'confirm_publish': True}",
            id="confirms-false",
        ),
        pytest.param(
            {"task_reject_on_worker_lost": False},
            "E002",
            "CELERY_TASK_REJECT_ON_WORKER_LOST = True",
            id="acks-late-without-reject",
        ),
        pytest.param({"task_acks_late": False}, "E003", "CELERY_TASK_ACKS_LATE = True", id="acks-early"),
        pytest.param({"task_serializer": "pickle"}, "E004", "CELERY_TASK_SERIALIZER", id="pickle-tasks"),
        pytest.param({"result_serializer": "pickle"}, "E004", "CELERY_RESULT_SERIALIZER", id="pickle-results"),
        pytest.param(
            {"accept_content": ["json", "pickle"]},
            "E004",
            "CELERY_ACCEPT_CONTENT = ['json']",
            id="accept-pickle",
        ),
        pytest.param(
            {"result_accept_content": ["json", "pickle"]},
            "E004",
            "CELERY_RESULT_ACCEPT_CONTENT",
            id="result-accept-pickle",
        ),
        pytest.param({"task_time_limit": None}, "E007", "CELERY_TASK_TIME_LIMIT", id="no-hard-limit"),
        pytest.param(
            {"task_time_limit": 1800}, "E007", "CELERY_TASK_TIME_LIMIT", id="hard-limit-equals-consumer-timeout"
        ),
        pytest.param(
            {"worker_prefetch_multiplier": 4},
            "E010",
            "CELERY_WORKER_PREFETCH_MULTIPLIER = 1",
            id="prefetch-4",
        ),
        pytest.param(
            {"worker_prefetch_multiplier": 0},
            "E010",
            "CELERY_WORKER_PREFETCH_MULTIPLIER = 1",
            id="prefetch-unlimited",
        ),
    ],
)
def test_unsafe_celery_setting(celery_conf: Any, celery: dict[str, Any], check_id: str, hint: str) -> None:
    celery_conf(**celery)
    error = only(check_id)
    assert hint in str(error.hint)


def test_pickle_is_named_in_the_message(celery_conf: Any) -> None:
    celery_conf(accept_content=["json", "pickle"])
    assert "pickle" in only("E004").msg


@pytest.mark.parametrize("remove", [False, True], ids=["none", "unset"])
def test_email_timeout_missing(settings: Any, remove: bool) -> None:
    if remove:
        del settings.EMAIL_TIMEOUT  # Django's own default is None
    else:
        settings.EMAIL_TIMEOUT = None
    assert "Set EMAIL_TIMEOUT" in str(only("E005").hint)


def test_email_timeout_may_exceed_the_lease_that_renewals_keep(settings: Any) -> None:
    """A live worker renews its claims while a slow send runs, so a mail-server timeout
    longer than the lease is fine (the lease bounds what a dead worker costs)."""
    assert settings.NOTIFICATIONS_CLAIM_LEASE == 6.0
    settings.EMAIL_TIMEOUT = 30
    assert check_pipeline() == []


@pytest.mark.parametrize("interval", [0.0001, 1.2, 2.0])
def test_renewals_often_enough_pass(settings: Any, interval: float) -> None:
    settings.NOTIFICATIONS_CLAIM_RENEW_INTERVAL = interval  # the lease is 6s in tests
    assert check_pipeline() == []


@pytest.mark.parametrize("interval", [2.5, 6, -1])
def test_renewals_too_rare_for_the_lease(settings: Any, interval: float) -> None:
    settings.NOTIFICATIONS_CLAIM_RENEW_INTERVAL = interval
    error = only("E012")
    assert "NOTIFICATIONS_CLAIM_LEASE (6.0s)" in error.msg
    assert "NOTIFICATIONS_CLAIM_RENEW_INTERVAL" in str(error.hint)


def test_email_timeout_too_close_to_the_consumer_timeout(settings: Any) -> None:
    settings.NOTIFICATIONS_CONSUMER_TIMEOUT = 20  # EMAIL_TIMEOUT is 1.5: 4.5s is fine
    assert check_pipeline() == []
    settings.EMAIL_TIMEOUT = 10
    error = only("E006")
    assert "consumer_timeout (20.0s)" in error.msg
    assert "NOTIFICATIONS_CONSUMER_TIMEOUT" in str(error.hint)


def test_hard_time_limit_above_the_consumer_timeout(settings: Any) -> None:
    settings.NOTIFICATIONS_CONSUMER_TIMEOUT = 5  # the tests' hard limit is 5s
    assert "consumer_timeout (5.0s)" in only("E007").msg


def test_retention_shorter_than_the_retry_horizon(settings: Any) -> None:
    settings.NOTIFICATIONS_SENT_RETENTION_DAYS = 0
    error = only("E008")
    assert "NOTIFICATIONS_SENT_RETENTION_DAYS" in str(error.hint)


def test_retention_is_weighed_against_attempts_and_lease(settings: Any) -> None:
    settings.NOTIFICATIONS_SENT_RETENTION_DAYS = 7
    assert check_pipeline() == []
    # 100 attempts, each of which may wait out an hour-long lease: about 4 days of retries.
    settings.NOTIFICATIONS_MAX_ATTEMPTS = 100
    settings.NOTIFICATIONS_CLAIM_LEASE = 3600
    assert "less than twice the longest retry horizon" in only("E008").msg


@pytest.mark.parametrize("value", ["maybe", "", "RESEND"])
def test_ambiguous_setting_must_be_resend_or_hold(settings: Any, value: str) -> None:
    settings.NOTIFICATIONS_AMBIGUOUS = value
    error = only("E009")
    assert "'resend'" in error.msg and "'hold'" in error.msg
    assert "NOTIFICATIONS_AMBIGUOUS" in str(error.hint)


@pytest.mark.parametrize("value", ["resend", "hold"])
def test_both_ambiguous_modes_pass(settings: Any, value: str) -> None:
    settings.NOTIFICATIONS_AMBIGUOUS = value
    assert check_pipeline() == []


@pytest.mark.parametrize("value", ["raise", "", "ERROR", None])
def test_key_reuse_setting_must_be_error_or_return(settings: Any, value: Any) -> None:
    """A misspelt NOTIFICATIONS_KEY_REUSE would silently mean "error"; the check says so."""
    settings.NOTIFICATIONS_KEY_REUSE = value
    error = only("E013")
    assert "'error'" in error.msg and "'return'" in error.msg
    assert "NOTIFICATIONS_KEY_REUSE" in str(error.hint)


@pytest.mark.parametrize("value", ["error", "return"])
def test_both_key_reuse_modes_pass(settings: Any, value: str) -> None:
    settings.NOTIFICATIONS_KEY_REUSE = value
    assert check_pipeline() == []


def test_every_error_says_what_to_set(settings: Any, celery_conf: Any) -> None:
    settings.EMAIL_TIMEOUT = None
    settings.NOTIFICATIONS_AMBIGUOUS = "maybe"
    settings.NOTIFICATIONS_SENT_RETENTION_DAYS = 0
    celery_conf(
        broker_transport_options={},
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        accept_content=["pickle"],
        task_time_limit=None,
        worker_prefetch_multiplier=4,
    )
    errors = check_pipeline()
    assert fired(errors) == [f"notifications.E00{i}" for i in (1, 2, 4, 5, 7, 8, 9)] + ["notifications.E010"]
    for error in errors:
        assert error.hint and error.hint.startswith(("Set ", "Keep ", "Raise ")), error.id


def test_manage_check_command_refuses_an_unsafe_setting(celery_conf: Any) -> None:
    celery_conf(worker_prefetch_multiplier=4)
    with pytest.raises(SystemCheckError) as caught:
        call_command("check")
    assert "notifications.E010" in str(caught.value)
    assert "CELERY_WORKER_PREFETCH_MULTIPLIER = 1" in str(caught.value)


# Real processes, configured from the environment as in production.


def run(args: list[str], env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout, kill that group and fail."""
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)} still running after {timeout}s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def project_defaults_env(**extra: str) -> dict[str, str]:
    """The environment of a production process with nothing configured: the project's
    own defaults, none of the test run's overrides."""
    test_overrides = ("NOTIFICATIONS_", "EMAIL_", "CELERY_", "DJANGO_", "DATABASE_URL", "REDIS_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(test_overrides)}
    env.update(PYTHONPATH=str(ROOT), DJANGO_SETTINGS_MODULE="project.settings", **extra)
    return env


def test_project_defaults_pass_manage_check() -> None:
    result = run([sys.executable, "manage.py", "check"], project_defaults_env())
    assert result.returncode == 0, result.stdout
    assert "System check identified no issues" in result.stdout


def test_manage_check_exits_non_zero_with_an_unsafe_environment() -> None:
    result = run([sys.executable, "manage.py", "check"], child_env(EMAIL_TIMEOUT="1000"))
    assert result.returncode != 0
    assert "notifications.E006" in result.stdout and "EMAIL_TIMEOUT=1000.0s" in result.stdout
    result = run([sys.executable, "manage.py", "check"], project_defaults_env(EMAIL_TIMEOUT="1000"))
    assert result.returncode != 0 and "notifications.E006" in result.stdout


def test_worker_refuses_to_start_with_an_unsafe_setting() -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "worker",
            "-l",
            "info",
            "-c",
            "1",
            "--without-mingle",
            "--without-gossip",
        ],
        child_env(EMAIL_TIMEOUT="1000"),
    )
    assert result.returncode != 0, result.stdout[-4000:]
    assert "refusing to start" in result.stdout and "notifications.E006" in result.stdout
    assert "HINT: Keep EMAIL_TIMEOUT at most a third" in result.stdout
    assert " ready." not in result.stdout


def test_beat_refuses_to_start_with_an_unsafe_setting(tmp_path: Path) -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "beat",
            "-l",
            "info",
            "-s",
            str(tmp_path / "schedule"),
        ],
        child_env(NOTIFICATIONS_AMBIGUOUS="maybe"),
    )
    assert result.returncode != 0, result.stdout[-4000:]
    assert "refusing to start" in result.stdout and "notifications.E009" in result.stdout
    assert "Sending due task" not in result.stdout


def test_worker_starts_with_the_same_command_and_safe_settings(workers: Any, django_db_setup: Any) -> None:
    # The control for the refusal above: same command, the test run's (safe) settings.
    worker = workers.start(concurrency=1)
    assert worker.proc.poll() is None
    assert "refusing to start" not in worker.output()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DELIVERY_BATCH_SIZE", 0),
        ("SEND_CONCURRENCY", -1),
        ("RELAY_BATCH_SIZE", "200"),
        ("SEND_CONCURRENCY", 2.5),
        ("MAX_BATCH_ITEMS", 0),
    ],
)
def test_batch_sizes_and_sending_connections_must_be_positive_integers(settings: Any, name: str, value: Any) -> None:
    setattr(settings, f"NOTIFICATIONS_{name}", value)
    error = only("E011")
    assert f"NOTIFICATIONS_{name}" in error.msg and repr(value) in error.msg


# The delivery broker: NOTIFICATIONS_BROKER and the Kafka settings.


def broker_errors() -> list[str]:
    from notifications.checks import check_broker

    return fired(check_broker())


def only_broker(check_id: str) -> Error:
    from notifications.checks import check_broker

    errors = check_broker()
    assert fired(errors) == [f"notifications.{check_id}"], [f"{e.id}: {e.msg}" for e in errors]
    [error] = errors
    assert error.is_serious()
    return error


@pytest.mark.parametrize("value", ["rabbitmq", "kafka"])
def test_both_brokers_pass(settings: Any, value: str) -> None:
    settings.NOTIFICATIONS_BROKER = value
    assert broker_errors() == []


@pytest.mark.parametrize("value", ["Kafka", "amqp", "", None, "redis"])
def test_broker_must_be_rabbitmq_or_kafka(settings: Any, value: Any) -> None:
    settings.NOTIFICATIONS_BROKER = value
    error = only_broker("E022")
    assert "'rabbitmq'" in error.msg and "'kafka'" in error.msg
    assert str(error.hint).startswith("Set NOTIFICATIONS_BROKER")


def test_kafka_without_confluent_kafka_installed(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # what an interpreter without it imports
    error = only_broker("E023")
    assert "confluent-kafka" in str(error.hint)
    settings.NOTIFICATIONS_BROKER = "rabbitmq"  # not needed for RabbitMQ
    assert broker_errors() == []


@pytest.mark.parametrize(
    "servers",
    [
        "127.0.0.1:9092",
        "kafka-1:9092, kafka-2:9092,kafka-3.example.com:19092",
        "[::1]:9092",
        "SASL_SSL://broker.example.com:9093",
        "localhost",
    ],
)
def test_bootstrap_servers_that_pass(settings: Any, servers: str) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    settings.NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS = servers
    assert broker_errors() == []


@pytest.mark.parametrize(
    "servers", ["", "  ", None, "kafka:port", "kafka:9092,", "kafka:0", "kafka:70000", "a b:9092", ["kafka:9092"]]
)
def test_bootstrap_servers_empty_or_malformed(settings: Any, servers: Any) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    settings.NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS = servers
    error = only_broker("E024")
    assert "KAFKA_BOOTSTRAP_SERVERS" in str(error.hint)
    settings.NOTIFICATIONS_BROKER = "rabbitmq"  # unused with RabbitMQ
    assert broker_errors() == []


@pytest.mark.parametrize("name", ["KAFKA_PARTITIONS", "KAFKA_REPLICATION_FACTOR"])
@pytest.mark.parametrize("value", [0, -1, "12", 2.0, True, None])
def test_partitions_and_replication_factor_must_be_positive_integers(settings: Any, name: str, value: Any) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    setattr(settings, f"NOTIFICATIONS_{name}", value)
    error = only_broker("E025")
    assert f"NOTIFICATIONS_{name}" in error.msg and repr(value) in error.msg


def test_kafka_config_must_be_a_dict_and_is_never_printed(settings: Any) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    settings.NOTIFICATIONS_KAFKA_CONFIG = "sasl.password=hunter2"
    error = only_broker("E027")
    assert "hunter2" not in error.msg + str(error.hint)
    settings.NOTIFICATIONS_KAFKA_CONFIG = {"security.protocol": "SASL_SSL", "sasl.password": "hunter2"}
    assert broker_errors() == []


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("kafka://127.0.0.1:9092", None),
        ("confluentkafka://kafka-1:9092", None),
        ("amqp://guest:guest@rabbit-1:5672//;kafka://kafka-1:9092", None),
        ("KAFKA://kafka-1:9092", None),
        (None, "confluentkafka"),
    ],
    ids=["kafka", "confluentkafka", "in-a-list", "upper-case", "transport"],
)
@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
def test_celery_on_kombus_kafka_transport_is_refused(
    settings: Any,
    celery_conf: Any,
    monkeypatch: pytest.MonkeyPatch,
    url: str | None,
    transport: str | None,
    broker: str,
) -> None:
    """The issue's bug: ``CELERY_BROKER_URL=kafka://...`` passed the checks and the first relay
    pass died. kombu's transport acks every partition at once and checks no delivery report."""
    settings.NOTIFICATIONS_BROKER = broker
    if url:  # Celery reads the variable before its own setting
        monkeypatch.setenv("CELERY_BROKER_URL", url)
    if transport:
        celery_conf(broker_transport=transport)
    error = only_broker("E026")
    assert "every assigned partition at once" in error.msg and "countdown" in error.msg
    hint = str(error.hint)
    assert "NOTIFICATIONS_BROKER=kafka" in hint and "KAFKA_BOOTSTRAP_SERVERS" in hint
    assert "keep CELERY_BROKER_URL on RabbitMQ" in hint and "Redis" in hint


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/0"])
def test_celery_on_rabbitmq_or_redis_beside_kafka_passes(
    settings: Any, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    settings.NOTIFICATIONS_BROKER = "kafka"
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    assert broker_errors() == []


def test_manage_check_refuses_celery_on_kafka() -> None:
    """As the issue reported it: the project's defaults, with only CELERY_BROKER_URL changed."""
    result = run(
        [sys.executable, "manage.py", "check"], project_defaults_env(CELERY_BROKER_URL="kafka://127.0.0.1:9092")
    )
    assert result.returncode != 0, result.stdout
    assert "notifications.E026" in result.stdout and "NOTIFICATIONS_BROKER=kafka" in result.stdout


def test_manage_check_passes_the_projects_kafka_environment() -> None:
    env = project_defaults_env(
        NOTIFICATIONS_BROKER="kafka", KAFKA_BOOTSTRAP_SERVERS="kafka-1:9092,kafka-2:9092", KAFKA_SASL_PASSWORD="x"
    )
    result = run([sys.executable, "manage.py", "check"], env)
    assert result.returncode == 0, result.stdout
    result = run([sys.executable, "manage.py", "check"], {**env, "NOTIFICATIONS_BROKER": "kafak"})
    assert result.returncode != 0 and "notifications.E022" in result.stdout


def test_worker_refuses_to_start_on_celerys_kafka_transport() -> None:
    result = run(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-c", "1", "--without-mingle", "--without-gossip"],
        child_env(CELERY_BROKER_URL="kafka://127.0.0.1:9"),
    )
    assert result.returncode != 0, result.stdout[-4000:]
    assert "refusing to start" in result.stdout and "notifications.E026" in result.stdout
