"""One benchmark: a private database per system, a RabbitMQ vhost and a Redis db, created
here and dropped at the end; the counting sink; then, per run, the sink's ceiling, our
pipeline's phases and the two peers', with the same N, workers and concurrency.

With ``brokers=("rabbitmq", "kafka")`` our pipeline's end-to-end phases run on each
delivery broker in turn, the order alternating from run to run, with the same database,
sink, N, workers and concurrency: for Kafka the run starts a local Tansu broker
(project/kafkabroker.py) and gives every round topics and a consumer group of its own."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from notifications.chaos.injectors import add_vhost, sh, wait
from notifications.chaos.processes import Fleet, Proc, migrate
from notifications.chaos.run import free_port

from . import cpu, measure, ours, peers, report
from .sink import Sink, ceiling

ROOT = Path(__file__).resolve().parent.parent.parent
SYSTEMS = ("sink", "ours", "plain", "postoffice")
BROKERS = ("rabbitmq", "kafka")
# A Kafka group is ready once stable this long: past the half session timeout (3 s) for
# which Tansu holds a new group's join open to more members.
KAFKA_STABLE_SECONDS = 5.0


def ours_key(broker: str) -> str:
    """Where a broker's results of our pipeline go in a run: ``ours`` for RabbitMQ (as
    before Kafka), ``ours_kafka`` for Kafka."""
    return "ours" if broker == "rabbitmq" else f"ours_{broker}"


@dataclass
class Options:
    n: int = 20000
    workers: int = 1
    concurrency: int = 2
    runs: int = 1
    only: tuple[str, ...] = SYSTEMS
    batch: int = 500
    paced_seconds: float = 30.0
    ceiling_messages: int = 5000
    stall: float = 120.0
    redis_db: int | None = None
    keep: bool = False
    brokers: tuple[str, ...] = ("rabbitmq",)
    settings: dict[str, str] = field(default_factory=dict)  # environment for our processes (--setting)


class BenchRun:
    def __init__(self, options: Options, log: Callable[[str], None] = print) -> None:
        self.o = options
        self._log = log
        self.id = uuid.uuid4().hex[:6]
        self.database = f"bench_{self.id}"
        self.po_database = f"bench_{self.id}_postoffice"
        self.vhost = f"notifications-bench-{self.id}"
        self.workdir = Path(os.environ.get("BENCH_WORKDIR", f"/tmp/notifications-bench-{self.id}"))
        self.started = time.monotonic()
        self.created: list[str] = []
        self.kafka: Any = None  # project.kafkabroker.Broker, when a run measures Kafka
        self.services: dict[str, list[int]] = {}

    def say(self, line: str) -> None:
        self._log(f"[{time.monotonic() - self.started:6.1f}s] {line}")

    # -- services ------------------------------------------------------------------------

    def _admin_sql(self, sql: str) -> None:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def sql(self, database: str, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}", autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def _pick_redis_db(self) -> int:
        if self.o.redis_db is not None:
            return self.o.redis_db
        for db in range(14, 0, -1):  # 15 is the chaos run's; tests pick at random among 1-15
            if redis.Redis(host="127.0.0.1", port=6379, db=db).dbsize() == 0:
                return db
        raise RuntimeError("no empty Redis database among 1-14: pass --redis-db")

    def _env(self) -> dict[str, str]:
        prefixes = ("NOTIFICATIONS_", "CELERY_BROKER", "EMAIL_", "DATABASE", "DJANGO_SETTINGS_MODULE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(self.sink.port),
        )
        return env

    def env_ours(self, broker: str = "rabbitmq", run: int = 1) -> dict[str, str]:
        env = {
            **self._env(),
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{self.database}",
            "REDIS_URL": f"redis://127.0.0.1:6379/{self.redis_db}",
            "NOTIFICATIONS_LOG_LEVEL": "WARNING",
            **self.o.settings,
        }
        if broker == "kafka":
            env.update(self.kafka_env(run))
        return env

    def kafka_topics(self, run: int) -> dict[str, str]:
        """Round ``run``'s topics and group: none of them seen by an earlier round."""
        suffix = f"bench-{self.id}-r{run}"
        return {
            "NOTIFICATIONS_KAFKA_TOPIC": f"notifications.deliver.{suffix}",
            "NOTIFICATIONS_KAFKA_HIGH_TOPIC": f"notifications.deliver.high.{suffix}",
            "NOTIFICATIONS_KAFKA_DEAD_TOPIC": f"notifications.dead.{suffix}",
            "NOTIFICATIONS_KAFKA_GROUP": f"notifications.{suffix}",
        }

    def kafka_partitions(self) -> int:
        """The shipped 12, or more: every pool process's consumer of a topic gets a partition."""
        return max(12, self.o.workers * self.o.concurrency)

    def kafka_env(self, run: int) -> dict[str, str]:
        assert self.kafka is not None, "the run's Kafka broker is not started"
        return {
            "NOTIFICATIONS_BROKER": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap,
            "NOTIFICATIONS_KAFKA_PARTITIONS": str(self.kafka_partitions()),
            **self.kafka_topics(run),
        }

    def env_peer(self) -> dict[str, str]:
        return {
            **self._env(),
            "DJANGO_SETTINGS_MODULE": "project.bench.peer_settings",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{self.po_database}",
        }

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_db = self._pick_redis_db()
        self.sink = Sink(free_port()).start()
        self.say(
            f"bench {self.id}: database {self.database}, vhost {self.vhost}, redis db {self.redis_db}, "
            f"SMTP sink on port {self.sink.port}, logs in {self.workdir}"
        )
        sh("redis-cli", "-n", str(self.redis_db), "flushdb")
        if {"ours", "plain"} & set(self.o.only):
            add_vhost(self.vhost)
            self.created.append("vhost")
        if "ours" in self.o.only:
            self._admin_sql(f'CREATE DATABASE "{self.database}"')
            self.created.append(self.database)
            migrate(ROOT, self.env_ours())
            if "kafka" in self.o.brokers:
                from project import kafkabroker

                self.kafka = kafkabroker.start(engine="tansu")
                partitions = self.kafka_partitions()
                self.say(f"Kafka: a Tansu broker on {self.kafka.bootstrap}, {partitions} partitions a topic")
        if "postoffice" in self.o.only:
            self._admin_sql(f'CREATE DATABASE "{self.po_database}"')
            self.created.append(self.po_database)
            migrate(ROOT, self.env_peer())
        self.services = self.find_services()

    def find_services(self) -> dict[str, list[int]]:
        """The root process of each service every phase uses: PostgreSQL's server (the parent
        of a backend of ours), the RabbitMQ node (its ``beam.smp``, not a CLI's), Redis (as it
        reports itself) and the sink. A service not found is left out."""
        # Asked while the connection is open: its backend exits with it, and with it the
        # /proc entry that names the server.
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            postmaster = cpu.parent(int(row[0])) if row else None
        found = {
            "postgresql": [postmaster] if postmaster else [],
            "rabbitmq": cpu.processes_named("beam.smp", "rabbit boot")[:1],
            "redis": [int(redis.Redis(host="127.0.0.1", port=6379).info("server")["process_id"])],
            "sink": [self.sink.pid],
        }
        return {name: pids for name, pids in found.items() if pids}

    def cpu_sampler(self, processes: Callable[[], dict[str, list[int]]]) -> cpu.CpuSampler:
        """A sampler of the services' CPU and of ``processes()``'s (the phase's own), with the
        share of PostgreSQL's spent on databases other than the run's (other users' noise)."""
        ours = (None, self.database, self.po_database)
        return cpu.CpuSampler(
            lambda: {**processes(), **self.services},
            shares={"postgresql_other_databases": ("postgresql", lambda pid: cpu.pg_database(pid) not in ours)},
        )

    def teardown(self) -> None:
        if hasattr(self, "sink"):
            self.sink.stop()
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
        if self.o.keep:
            return
        if "vhost" in self.created:
            sh("rabbitmqctl", "-q", "delete_vhost", self.vhost)
        for database in (self.database, self.po_database):
            if database in self.created:
                try:
                    self._admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                except psycopg.Error as exc:
                    self.say(f"could not drop {database}: {exc}")
        if hasattr(self, "redis_db"):
            sh("redis-cli", "-n", str(self.redis_db), "flushdb")

    # -- building blocks -----------------------------------------------------------------

    def fleet(self, env: dict[str, str]) -> Fleet:
        return Fleet(root=ROOT, env=env, logs=self.workdir)

    def workers(self, fleet: Fleet, prefix: str, app: str, queues: str) -> list[Proc]:
        procs = []
        for i in range(self.o.workers):
            name = f"{prefix}-worker{i}"
            args = ["-m", "celery", "-A", app, "worker", "-l", "warning", "-c", str(self.o.concurrency)]
            args += ["-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-Q", queues]
            procs.append(fleet.add(name, args))
        return procs

    def wait_consumers(self, queue: str, procs: list[Proc], timeout: float = 90.0) -> None:
        """Ready means consuming: every worker has a consumer on ``queue``."""

        def ready() -> bool:
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited: see {proc.log}")
            out = sh("rabbitmqctl", "-q", "list_queues", "-p", self.vhost, "name", "consumers").stdout
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue and parts[1].isdigit():
                    return int(parts[1]) >= len(procs)
            return False

        if not wait(ready, timeout, 0.5):
            raise RuntimeError(f"workers not consuming {queue} within {timeout:.0f}s: see {self.workdir}")

    def wait_kafka_consumers(self, env: dict[str, str], procs: list[Proc], timeout: float = 90.0) -> None:
        """Ready means consuming: the group is stable, and has stayed so for longer than a
        broker holds a join for late members (Tansu answers a describe with no members, so
        they cannot be counted; every pool process starts its consumers at once)."""
        from confluent_kafka import ConsumerGroupState, KafkaException
        from confluent_kafka.admin import AdminClient

        client = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"], "log_level": 0})
        group = env["NOTIFICATIONS_KAFKA_GROUP"]
        hold = KAFKA_STABLE_SECONDS
        stable_since: list[float] = []

        def ready() -> bool:
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited: see {proc.log}")
            try:
                [future] = client.describe_consumer_groups([group], request_timeout=5).values()
                state = future.result(timeout=5).state
            except KafkaException:
                state = None
            if state != ConsumerGroupState.STABLE:
                stable_since.clear()
                return False
            if not stable_since:
                stable_since.append(time.monotonic())
            return time.monotonic() - stable_since[0] >= hold

        if not wait(ready, timeout, 0.5):
            raise RuntimeError(f"workers not consuming group {group} within {timeout:.0f}s: see {self.workdir}")

    def caller(self, system: str, mode: str, n: int, tag: str, env: dict[str, str], rate: float = 0.0) -> Any:
        out = self.workdir / f"calls-{tag}.json"
        cmd = [sys.executable, "-m", "project.bench.caller", "--system", system, "--mode", mode]
        cmd += ["--n", str(n), "--batch", str(self.o.batch), "--rate", str(rate), "--tag", tag, "--out", str(out)]
        log = open(self.workdir / f"caller-{tag}.log", "wb")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc.out = out  # type: ignore[attr-defined]
        return proc

    def calls(self, proc: Any) -> dict[str, Any]:
        if proc.wait() != 0:
            raise RuntimeError(f"the caller failed: see {self.workdir}/caller-*.log")
        return dict(json.loads(Path(proc.out).read_text()))

    def call(self, system: str, mode: str, n: int, tag: str, env: dict[str, str]) -> dict[str, Any]:
        """Run a caller to the end with nothing consuming: the caller's own rate."""
        return measure.caller_only(self.calls(self.caller(system, mode, n, tag, env)))

    def end_to_end(
        self,
        system: str,
        mode: str,
        n: int,
        tag: str,
        env: dict[str, str],
        fleet: Fleet,
        processes: Callable[[], dict[str, list[int]]],
        rate: float = 0.0,
    ) -> dict[str, Any]:
        """Start a caller while the workers run; wait until the sink has every email.
        ``processes()`` names the phase's processes whose CPU counts (``worker``, ``beat``);
        the caller's is added."""
        self.sink.take()
        base = self.sink.count
        caller: list[int] = []
        with self.cpu_sampler(lambda: {**processes(), "caller": caller}) as sampler:
            proc = self.caller(system, mode, n, tag, env, rate)
            caller.append(proc.pid)

            def broken() -> str | None:
                if proc.poll() not in (None, 0):
                    return "the caller failed"
                dead = [p.name for p in fleet.procs.values() if not p.alive()]
                return f"{', '.join(dead)} exited" if dead else None

            measure.wait_for_sink(lambda: self.sink.count, base + n, self.o.stall, self.say, tag, broken, base)
        result = measure.delivery(self.calls(proc), self.sink.take(), sampler)
        self.say(f"  {tag}: {report.one_line(result)}")
        return result

    # -- the whole benchmark -------------------------------------------------------------

    def run_sink(self) -> dict[str, Any]:
        m = self.o.ceiling_messages
        self.say(f"sink: ceiling, {m} messages per connection")
        return {
            "one_connection": ceiling(self.sink, m, 1, ROOT, self.say),
            "two_connections": ceiling(self.sink, m, 2, ROOT, self.say),
        }

    def run_once(self, run: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        began = time.monotonic()
        # Each broker's leg in turn, the order reversed every other run, so neither is
        # always the one measured on a warmer (or busier) machine.
        brokers = self.o.brokers if run % 2 else tuple(reversed(self.o.brokers))
        steps: list[tuple[str, str, Callable[[int], dict[str, Any]]]] = [("sink", "sink", lambda r: self.run_sink())]
        steps += [("ours", ours_key(b), lambda r, b=b: ours.run_ours(self, r, b)) for b in brokers]  # type: ignore[misc]
        steps += [
            ("plain", "plain", lambda r: peers.run_plain(self, r)),
            ("postoffice", "postoffice", lambda r: peers.run_postoffice(self, r)),
        ]
        for system, key, step in steps:
            if system in self.o.only:
                began_step = time.monotonic()
                out[key] = step(run)
                out[key]["wall_seconds"] = round(time.monotonic() - began_step, 1)
        out["wall_seconds"] = round(time.monotonic() - began, 1)
        return out

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            setup = report.setup(self)
            runs = []
            for run in range(1, self.o.runs + 1):
                self.say(f"run {run} of {self.o.runs}")
                runs.append(self.run_once(run))
            return {"setup": setup, "median": median(runs), "runs": runs}
        finally:
            self.teardown()


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-metric median over runs (the same structure as one run)."""

    def merge(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]
        if not present:
            return None
        if isinstance(present[0], dict):
            keys = {k for v in present for k in v}
            return {k: merge([v.get(k) for v in present]) for k in sorted(keys)}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            return round(statistics.median(present), 3)
        return present[0]

    merged = merge(runs)
    return dict(merged) if merged else {}
