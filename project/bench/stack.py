"""A private pipeline for one benchmark process: a database, a RabbitMQ vhost, a Redis
db and the counting SMTP sink of its own, with beat and workers started on demand.

Used by ``python -m project.bench.schedule`` and ``python -m project.bench.priority``,
which measure from inside the process that calls ``notify()``: settings are read once,
when Django starts, so ``Stack.setup()`` points this process's environment at the run's
services before ``django.setup()``, with nothing inherited that configures the pipeline
(a test run's short timings, say): what is measured is the shipped settings. Workers
and beat get the same environment, so they run the project as ``make run`` does.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from notifications.chaos.injectors import add_vhost, sh
from notifications.chaos.processes import Fleet, Proc
from notifications.chaos.run import free_port

from .sink import Sink

ROOT = Path(__file__).resolve().parent.parent.parent
# What configures the pipeline: none of it is inherited from the calling environment.
INHERITED = ("NOTIFICATIONS_", "CELERY_", "EMAIL_", "DATABASE", "DJANGO_SETTINGS_MODULE", "REDIS_URL", "PGAPPNAME")
# Worker pool size of `make run` (manage.py devstack --concurrency, default 2).
RUN_CONCURRENCY = 2


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class Stack:
    """One run's services, created by ``setup()`` and removed by ``teardown()``."""

    def __init__(self, name: str, log: Callable[[str], None] = print, keep: bool = False) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.name = name
        self.keep = keep
        self._log = log
        self.started = time.monotonic()
        self.database = f"bench_{name}_{self.id}"
        self.vhost = f"notifications-bench-{name}-{self.id}"
        self.workdir = Path(f"/tmp/notifications-bench-{name}-{self.id}")
        self.server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/notifications")
        self.created: list[str] = []
        self.fleet: Fleet | None = None
        self.sink: Sink | None = None
        self.redis_db: int | None = None

    def say(self, line: str) -> None:
        self._log(f"[{time.monotonic() - self.started:6.1f}s] {line}")

    # -- services

    def _admin_sql(self, sql: str) -> None:
        with psycopg.connect(_with_database(self.server, "postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def _pick_redis_db(self) -> int:
        # 15 is the chaos run's, `manage.py bench` takes 14 down and bench_backlog 13 down:
        # starting at 12 keeps this run apart from them when they run together.
        for db in range(12, 0, -1):
            if redis.Redis(host="127.0.0.1", port=6379, db=db).dbsize() == 0:
                return db
        raise RuntimeError("no empty Redis database among 1-12")

    def env(self) -> dict[str, str]:
        """The environment of this process and of every worker and beat of the run."""
        assert self.sink is not None and self.redis_db is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            DJANGO_SETTINGS_MODULE="project.settings",
            DATABASE_URL=_with_database(self.server, self.database),
            CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            REDIS_URL=f"redis://127.0.0.1:6379/{self.redis_db}",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(self.sink.port),
            NOTIFICATIONS_LOG_LEVEL="WARNING",
        )
        return env

    def setup(self) -> None:
        """Create the run's services, point this process at them and start Django."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_db = self._pick_redis_db()
        self.sink = Sink(free_port()).start()
        self.say(
            f"bench {self.name} {self.id}: database {self.database}, vhost {self.vhost}, redis db {self.redis_db}, "
            f"SMTP sink on port {self.sink.port}, logs in {self.workdir}"
        )
        add_vhost(self.vhost)
        self.created.append("vhost")
        self._admin_sql(f'CREATE DATABASE "{self.database}"')
        self.created.append("database")
        for key in [k for k in os.environ if k.startswith(INHERITED)]:
            del os.environ[key]
        os.environ.update(self.env())
        import django

        django.setup()
        from django.core.management import call_command

        import project.celery  # noqa: F401  (notify()'s wake-ups and queue probes use this run's broker)

        call_command("migrate", verbosity=0)
        self.fleet = Fleet(root=ROOT, env=self.env(), logs=self.workdir)

    def teardown(self, failed: bool = False) -> None:
        """Stop the processes and remove what ``setup()`` created (kept with ``keep``;
        the processes' logs are kept after a failure too)."""
        if self.fleet is not None:
            self.fleet.stop_all()
        if self.sink is not None:
            self.sink.stop()
        if "database" in self.created:
            from django.db import connections

            connections.close_all()
        if self.keep:
            self.say(f"kept database {self.database} and vhost {self.vhost}")
            return
        if "vhost" in self.created:
            sh("rabbitmqctl", "-q", "delete_vhost", self.vhost)
        if "database" in self.created:
            try:
                self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            except psycopg.Error as exc:
                self.say(f"could not drop {self.database}: {exc}")
        if self.redis_db is not None:
            self._forget_redis_keys()
        if failed:
            self.say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _forget_redis_keys(self) -> None:
        """Delete the run's Redis keys only: the relay's are named by the run's database,
        the locks by its notification keys (whose service names carry the run's id), so
        another run that happens to share the db loses nothing."""
        assert self.redis_db is not None
        client = redis.Redis(host="127.0.0.1", port=6379, db=self.redis_db)
        try:
            from notifications.relay import LOOP_ALIVE, WAKE_FLAG, WAKE_LIST, key

            names = [f"notifications:{key(name)}" for name in (WAKE_FLAG, WAKE_LIST, LOOP_ALIVE)]
        except Exception:  # Django never started: nothing of the relay's was written
            names = []
        names += [k.decode() for k in client.scan_iter(match=f"notifications:*{self.id}*", count=1000)]
        if names:
            client.delete(*names)

    # -- processes

    def queues(self) -> str:
        """Every queue the pipeline's workers consume: both delivery queues (high first)
        and the relay's, as a worker started without ``-Q`` does."""
        from notifications import broker
        from notifications.conf import settings

        return ",".join([*broker.delivery_queue_names(), str(settings.RELAY_QUEUE)])

    def start_beat(self) -> Proc:
        """``celery -A project beat`` with its relay loop; returns once the loop's
        heartbeat shows (it has made its first pass)."""
        from notifications import relay

        assert self.fleet is not None
        schedule = str(self.workdir / "beat-schedule")
        proc = self.fleet.add("beat", ["-m", "celery", "-A", "project", "beat", "-l", "warning", "-s", schedule])
        self.wait(lambda: relay.loop_alive() or self._exited(proc), 60, "beat's relay loop")
        return proc

    def start_worker(self, name: str = "worker", concurrency: int = RUN_CONCURRENCY, queues: str = "") -> Proc:
        """``celery -A project worker -c N`` (prefork) on ``queues`` (default: every
        pipeline queue); returns once it consumes the delivery queues among them."""
        from notifications import broker

        assert self.fleet is not None
        queues = queues or self.queues()
        args = ["-m", "celery", "-A", "project", "worker", "-l", "warning", "-c", str(concurrency)]
        args += ["-n", f"{name}-{self.id}@%h", "--without-mingle", "--without-gossip", "-Q", queues]
        proc = self.fleet.add(name, args)
        delivery = [q for q in broker.delivery_queue_names() if q in queues.split(",")]

        def consuming() -> bool:
            self._exited(proc)
            return all((self.queue_state(q) or (0, 0))[1] >= 1 for q in delivery)

        self.wait(consuming, 90, f"{name} consuming {', '.join(delivery)}", step=0.2)
        return proc

    def _exited(self, proc: Proc) -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: see {proc.log}")
        return False

    def alive(self) -> str | None:
        """The name of a run's process that exited, if one did."""
        assert self.fleet is not None
        dead = [p.name for p in self.fleet.procs.values() if not p.alive()]
        return f"{', '.join(dead)} exited (see {self.workdir})" if dead else None

    def queue_state(self, name: str) -> tuple[int, int] | None:
        """``(ready messages, consumers)`` of a queue, None while it does not exist."""
        from celery import current_app

        with current_app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            try:
                _, messages, consumers = channel.queue_declare(queue=name, passive=True)
            except Exception:  # not declared yet: the passive declare closed the channel
                return None
            return int(messages), int(consumers)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
        """Poll ``predicate`` until it is truthy; raise (naming ``what``) after ``timeout``
        seconds, or as soon as one of the run's processes has exited."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.fleet is not None and (dead := self.alive()):
                raise RuntimeError(f"waiting for {what}: {dead}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout:.0f}s (logs in {self.workdir})")
            time.sleep(step)

    # -- the run's description

    def describe(self) -> dict[str, Any]:
        """What the figures were measured on: the machine, the versions, the commit."""
        from importlib import metadata

        from .report import _revision

        with psycopg.connect(_with_database(self.server, "postgres")) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            buffers = conn.execute("SHOW shared_buffers").fetchone()
        return {
            "id": self.id,
            "database": self.database,
            "vhost": self.vhost,
            "redis_db": self.redis_db,
            "code": _revision(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "celery": metadata.version("celery"),
            "django": metadata.version("django"),
            "postgresql": version[0].split()[0] if version else None,
            "shared_buffers": buffers[0] if buffers else None,
            "rabbitmq": sh("rabbitmqctl", "-q", "version").stdout.strip() or None,
        }


class Arrivals:
    """What the run's sink has received so far, by key: every copy's arrival time."""

    def __init__(self, stack: Stack) -> None:
        assert stack.sink is not None
        self.sink = stack.sink
        self.at: dict[str, list[float]] = {}

    def collect(self) -> None:
        for key, at in self.sink.take():
            self.at.setdefault(key, []).append(at)

    def has(self, *keys: str) -> bool:
        """Whether every one of ``keys`` has arrived (collecting what came first)."""
        self.collect()
        return all(key in self.at for key in keys)

    def first(self, key: str) -> float | None:
        copies = self.at.get(key)
        return copies[0] if copies else None
