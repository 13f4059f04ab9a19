"""One chaos run: set up a private database, vhost and Redis db, start the pipeline's
real processes and a misbehaving SMTP server, drive a caller through them while faults
land at seeded random times, let everything drain, and judge the outcome."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from . import mailserver, report
from .injectors import INJECTORS, KAFKA_FAULTS, TRAFFIC_FAULTS, add_vhost, run_in_background, sh, wait
from .processes import Fleet, migrate

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Options:
    n: int = 5000
    duration: float = 60.0
    seed: int = 1
    faults: list[str] = field(default_factory=list)
    workers: int = 3
    concurrency: int = 2
    mode: str = "resend"
    fault_every: float = 3.0
    drain_timeout: float = 60.0
    consumer_timeout: float | None = None  # RabbitMQ's own unless given
    redis_db: int = 15
    poison: int = 3
    out: Path = Path("chaos-report.json")
    keep: bool = False
    # Settings changed for the run (environment variable -> value); none by default:
    # the run proves project/settings.py as shipped, and the report lists any change.
    changes: dict[str, str] = field(default_factory=dict)
    # A three-node RabbitMQ cluster of the run's own instead of the machine's broker.
    cluster: bool = False
    # The traffic beside the plain notifications: shares of the kinds (caller.DEFAULT_MIX
    # unless given, as "kind=share,..."), the share sent through the rate-limited bulk
    # backend and its rate, and the size of the one burst into it (None: two seconds' worth).
    mix: str = ""
    bulk_share: float = 0.5
    bulk_rate: float = 40.0
    burst: int | None = None
    # The delivery path: "rabbitmq" (the quorum queues) or "kafka" (Celery's own messages
    # stay on RabbitMQ either way). On Kafka the run starts a Tansu broker of its own behind
    # a line it can cut, unless kafka_bootstrap names one (which it can neither restart
    # nor cut off).
    broker: str = "rabbitmq"
    kafka_bootstrap: str | None = None


# What the report quotes of the settings the pipeline ran with.
REPORTED_SETTINGS = (
    "NOTIFICATIONS_CLAIM_LEASE",
    "NOTIFICATIONS_CLAIM_RENEW_INTERVAL",
    "NOTIFICATIONS_RECOVER_INTERVAL",
    "NOTIFICATIONS_MAX_ATTEMPTS",
    "NOTIFICATIONS_RETRY_BACKOFF",
    "NOTIFICATIONS_RETRY_BACKOFF_MAX",
    "NOTIFICATIONS_DELIVERY_LIMIT",
    "NOTIFICATIONS_RELAY_INTERVAL",
    "NOTIFICATIONS_MAX_MESSAGE_BYTES",
    "EMAIL_TIMEOUT",
    "CELERY_TASK_SOFT_TIME_LIMIT",
    "CELERY_TASK_TIME_LIMIT",
    "NOTIFICATIONS_BACKENDS",
    "NOTIFICATIONS_BROKER",
    "NOTIFICATIONS_RECOVER_UNCLAIMED_AFTER",
)
# Quoted too when the delivery path is on Kafka.
REPORTED_KAFKA_SETTINGS = (
    "NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS",
    "NOTIFICATIONS_KAFKA_TOPIC",
    "NOTIFICATIONS_KAFKA_HIGH_TOPIC",
    "NOTIFICATIONS_KAFKA_DEAD_TOPIC",
    "NOTIFICATIONS_KAFKA_GROUP",
    "NOTIFICATIONS_KAFKA_PARTITIONS",
    "NOTIFICATIONS_KAFKA_SESSION_TIMEOUT",
    "NOTIFICATIONS_KAFKA_BUDGET",
)

# The named backends the traffic goes through, each to a listener of the run's mail
# server with the same name; Django's own EMAIL_HOST/EMAIL_PORT point at a third, so an
# email sent through no named backend shows as such.
TRANSACTIONAL, BULK = "transactional", "bulk"
SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"


# The promise: a dead or cut-off worker's notifications are delivered (or held) within
# this many seconds of its death, p99, with the shipped settings.
TAKEOVER_LIMIT = 30.0


class ChaosRun:
    def __init__(self, options: Options, log: Any = print) -> None:
        self.o = options
        self.say = log
        self.id = f"{options.seed}_{uuid.uuid4().hex[:6]}"
        self.database = f"chaos_{self.id}"
        self.vhost = f"notifications-chaos-{self.id}"
        self.redis_db = options.redis_db
        self.line: Any = None  # the database line of worker0, which the pg_cut fault cuts
        self.victims: list[dict[str, Any]] = []  # claims held by killed or cut-off workers
        self.probe_failures: list[str] = []  # what a view-only admin user managed to change
        self.cluster: Any = None
        self.lock = threading.Lock()
        self.busy: set[str] = set()
        self.faults: list[dict[str, Any]] = []
        self.workdir = Path(os.environ.get("CHAOS_WORKDIR", f"/tmp/notifications-chaos-{self.id}"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self._consumer_timeout_before: str | None = None
        self.on_kafka = options.broker == "kafka"
        self.kafka: Any = None  # the run's own Tansu broker (tansu.Tansu)
        self.kafka_line: Any = None  # the line every Kafka client reaches it through
        self.kafka_bootstrap = options.kafka_bootstrap or ""
        self.topics = {
            "NOTIFICATIONS_KAFKA_TOPIC": f"chaos.{self.id}.deliver",
            "NOTIFICATIONS_KAFKA_HIGH_TOPIC": f"chaos.{self.id}.deliver.high",
            "NOTIFICATIONS_KAFKA_DEAD_TOPIC": f"chaos.{self.id}.dead",
            "NOTIFICATIONS_KAFKA_GROUP": f"chaos-{self.id}",
        }

    # -- bookkeeping ---------------------------------------------------------------------

    def record_fault(self, kind: str, started: float, detail: str) -> None:
        with self.lock:
            self.faults.append({"kind": kind, "at": round(started - self.started, 2), "detail": detail})
        self.say(f"  fault {kind:<15} t={started - self.started:6.1f}s  {detail}")

    # -- services ------------------------------------------------------------------------

    def restore_consumer_timeout(self, lowered: bool) -> None:
        if self.o.consumer_timeout is None:
            return
        value = int(self.o.consumer_timeout * 1000) if lowered else self._consumer_timeout_before
        if value is None:
            return
        sh("rabbitmqctl", "-q", "eval", f"application:set_env(rabbit, consumer_timeout, {value}).")

    def ensure_services(self) -> None:
        if sh("redis-cli", "ping").stdout.strip() != "PONG":
            from .injectors import REDIS_START

            sh(*REDIS_START)
            wait(lambda: sh("redis-cli", "ping").stdout.strip() == "PONG", 30, 0.2)
        if self.kafka is not None and not self.kafka.running():
            self.kafka.start()
        if self.cluster is not None:
            self.cluster.ensure_running()
            return
        if sh("rabbitmqctl", "-q", "await_startup", timeout=180).returncode != 0:
            sh("rabbitmqctl", "-q", "start_app")
            sh("rabbitmqctl", "-q", "await_startup", timeout=180)

    def _admin_sql(self, sql: str) -> None:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def env(self) -> dict[str, str]:
        """The pipeline's environment: the run's own database, vhost, Redis db and mail
        server, the mode under test, and nothing else but ``--set`` changes, so that what
        runs is ``project/settings.py`` as shipped (settings given in this process's
        environment are left out too)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFICATIONS_", "CELERY_", "EMAIL_", "DATABASE", "DJANGO_", "REDIS_", "KAFKA_"))
        }
        env.update(
            # project/settings.py, plus only the named backends and the template directory
            # the traffic needs (notifications/chaos/settings.py).
            DJANGO_SETTINGS_MODULE="notifications.chaos.settings",
            CHAOS_BASE_SETTINGS="project.settings",
            CHAOS_BACKENDS=json.dumps(self.backends()),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.database}",
            CELERY_BROKER_URL=self.broker_url(),
            REDIS_URL=f"redis://127.0.0.1:6379/{self.redis_db}",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(self.mail.port),
            NOTIFICATIONS_AMBIGUOUS=self.o.mode,
            # Logging only: the pipeline's warnings, not every delivery.
            NOTIFICATIONS_LOG_LEVEL="WARNING",
        )
        if self.on_kafka:
            env.update(NOTIFICATIONS_BROKER="kafka", KAFKA_BOOTSTRAP_SERVERS=self.kafka_bootstrap, **self.topics)
        if self.o.consumer_timeout is not None:
            env["NOTIFICATIONS_CONSUMER_TIMEOUT"] = str(self.o.consumer_timeout)
        if "poison" in self.o.faults:
            env["NOTIFICATIONS_CRASH_POINTS"] = "before_claim=chaos:poison-"
        env.update(self.o.changes)
        return env

    def backends(self) -> dict[str, dict[str, Any]]:
        """``NOTIFICATIONS_BACKENDS`` of the run: two SMTP backends, each to its own listener
        of the run's mail server; the bulk one rate-limited, with two connections."""
        ports = self.mail.ports

        def smtp(name: str) -> dict[str, Any]:
            return {"BACKEND": SMTP_BACKEND, "OPTIONS": {"host": "127.0.0.1", "port": ports[name]}}

        return {
            TRANSACTIONAL: smtp(TRANSACTIONAL),
            BULK: {**smtp(BULK), "RATE_LIMIT": self.o.bulk_rate, "CONNECTIONS": 2},
        }

    def broker_url(self) -> str:
        if self.cluster is not None:
            return str(self.cluster.broker_url(self.vhost))
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def effective_settings(self) -> dict[str, Any]:
        """The settings the pipeline's processes run with, as they read them."""
        code = (
            "import json, django; django.setup()\n"
            "from django.conf import settings\n"
            "from notifications.conf import settings as conf\n"
            f"names = {list(self.reported_settings())!r}\n"
            "out = {}\n"
            "for name in names:\n"
            "    short = name.removeprefix('NOTIFICATIONS_')\n"
            "    out[name] = getattr(conf, short) if name != short else getattr(settings, name)\n"
            "print(json.dumps(out))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"could not read the settings:\n{done.stderr[-2000:]}")
        values: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return values

    def reported_settings(self) -> tuple[str, ...]:
        return (*REPORTED_SETTINGS, *REPORTED_KAFKA_SETTINGS) if self.on_kafka else REPORTED_SETTINGS

    def start_kafka(self) -> None:
        """The run's own Tansu broker, advertising a line the run can cut (unless
        ``--kafka-bootstrap`` named a broker)."""
        if self.o.kafka_bootstrap:
            from .tansu import answers

            if not answers(self.o.kafka_bootstrap, timeout=5.0):
                raise RuntimeError(f"no Kafka broker answers on {self.o.kafka_bootstrap}")
            self.say(f"Kafka: the broker at {self.kafka_bootstrap} (not restarted, not cut off)")
            return
        from .netcut import LineCut
        from .tansu import Tansu

        port = free_port()
        self.kafka_line = LineCut(port=port, kafka=True).start()
        self.kafka = Tansu(port, self.kafka_line.port, self.workdir / "kafka.log").start()
        self.kafka_bootstrap = self.kafka.advertised
        self.say(f"Kafka: Tansu on :{port}, every client through a line on {self.kafka_bootstrap}")

    def setup(self) -> None:
        self.say(f"chaos run {self.id}: database {self.database}, vhost {self.vhost}, redis db {self.redis_db}")
        self.ensure_services()
        if self.on_kafka:
            self.start_kafka()
        self.mail = mailserver.start(
            free_port(), seed=self.o.seed, listeners={TRANSACTIONAL: free_port(), BULK: free_port()}
        )
        self._admin_sql(f'CREATE DATABASE "{self.database}"')
        if self.o.cluster:
            from .cluster import Cluster

            self.cluster = Cluster(
                self.workdir / "rabbit", self.id, consumer_timeout=self.o.consumer_timeout, log=self.say
            )
            seconds = self.cluster.start()
            self.say(f"RabbitMQ cluster of {len(self.cluster.nodes)} nodes up in {seconds:.1f}s")
            self.cluster.add_vhost(self.vhost)
        else:
            add_vhost(self.vhost)
            before = sh("rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout).").stdout
            digits = "".join(ch for ch in before if ch.isdigit())
            self._consumer_timeout_before = digits or "1800000"
            self.restore_consumer_timeout(lowered=True)
        sh("redis-cli", "-n", str(self.redis_db), "flushdb")
        migrate(ROOT, self.env())
        self.settings = self.effective_settings()
        self.lease = float(self.settings["NOTIFICATIONS_CLAIM_LEASE"])
        self.email_timeout = float(self.settings["EMAIL_TIMEOUT"])
        self.slow_reply = self.email_timeout + 1.5  # the server keeps it; the client gave up
        self.hang_reply = self.email_timeout + 5.0
        self.fleet = Fleet(root=ROOT, env=self.env(), logs=self.workdir)
        if "pg_cut" in self.o.faults:
            from .netcut import LineCut

            self.line = LineCut(port=5432).start()
        for i in range(self.o.workers):
            if i == 0 and self.line is not None:  # worker0 reaches PostgreSQL through a line that can be cut
                url = f"postgres://postgres@127.0.0.1:{self.line.port}/{self.database}"
                self.fleet.worker(f"worker{i}", self.o.concurrency, DATABASE_URL=url)
            else:
                self.fleet.worker(f"worker{i}", self.o.concurrency)
        self.fleet.beat()
        for proc in self.fleet.workers():
            self.fleet.wait_ready(proc)
        if self.cluster is not None:
            self.cluster.wait_members(self.vhost)

    def teardown(self) -> None:
        if self.line is not None:
            self.line.restore()
        if hasattr(self, "fleet"):
            self.fleet.stop_all()
        if self.line is not None:
            self.line.stop()
        if self.kafka is not None:
            self.kafka.stop()
        if self.kafka_line is not None:
            self.kafka_line.stop()
        if self.cluster is not None:
            self.cluster.teardown()
        else:
            self.restore_consumer_timeout(lowered=False)
        if hasattr(self, "mail"):
            self.mail.stop()
        if not self.o.keep and self.cluster is None:
            sh("rabbitmqctl", "-q", "delete_vhost", self.vhost)
            try:
                self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            except psycopg.Error as exc:
                self.say(f"could not drop {self.database}: {exc}")

    # -- the run -------------------------------------------------------------------------

    def traffic(self) -> subprocess.Popen[bytes]:
        self.calls_file = self.workdir / "calls.jsonl"
        self.meta_file = self.workdir / "calls-meta.json"
        burst = self.o.burst if self.o.burst is not None else int(2 * self.o.bulk_rate)
        poison = self.o.poison if "poison" in self.o.faults else 0
        undecodable = max(2, self.o.n // 500) if "undecodable" in self.o.faults else 0
        oversized = max(1, self.o.n // 2500) if "oversized" in self.o.faults else 0
        cmd = [
            sys.executable,
            "-m",
            "notifications.chaos.caller",
            "--n",
            str(self.o.n),
            "--seed",
            str(self.o.seed),
            "--rate",
            str(self.o.n / self.o.duration),
            "--poison",
            str(poison),
            "--undecodable",
            str(undecodable),
            "--oversized",
            str(oversized),
            "--mix",
            self.o.mix,
            "--backends",
            f"{TRANSACTIONAL},{BULK}",
            "--bulk-share",
            str(self.o.bulk_share),
            "--burst",
            str(burst),
            "--out",
            str(self.calls_file),
            "--meta",
            str(self.meta_file),
        ]
        log = open(self.workdir / "caller.log", "wb")  # noqa: SIM115 (owned by the child)
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def schedule(self) -> list[tuple[float, str]]:
        rng = random.Random(self.o.seed)
        kinds = [k for k in self.o.faults if k in self.injectors()]
        if not kinds:
            return []
        count = max(len(kinds), int(self.o.duration / self.o.fault_every))
        order = list(kinds)
        rng.shuffle(order)
        while len(order) < count:
            order.append(rng.choice(kinds))
        plan = []
        for kind in order:
            # A node fault needs traffic after it, or the pause it causes cannot be seen.
            end = self.o.duration - 10.0 if kind.startswith("rabbit_leader") else self.o.duration
            plan.append((rng.uniform(1.0, max(2.0, end)), kind))
        return sorted(plan)

    def injectors(self) -> dict[str, Any]:
        """The faults of this run: with a cluster of its own, the leader faults replace
        the machine node's restart, and closing connections closes the cluster's."""
        if self.on_kafka:
            # RabbitMQ's faults stay: it still carries Celery's messages (relay wake-ups,
            # recover, purge, dead-letter passes).
            return dict(INJECTORS)
        if self.cluster is None and not self.o.cluster:
            return {k: v for k, v in INJECTORS.items() if k not in KAFKA_FAULTS}
        from .cluster import rabbit_leader_kill, rabbit_leader_stop
        from .injectors import Injector

        out = {k: v for k, v in INJECTORS.items() if k not in ("rabbit_restart", "rabbit_close", *KAFKA_FAULTS)}
        out["rabbit_close"] = Injector("rabbit_close", False, _cluster_close)
        out["rabbit_leader_stop"] = Injector("rabbit_leader_stop", False, rabbit_leader_stop)
        out["rabbit_leader_kill"] = Injector("rabbit_leader_kill", False, rabbit_leader_kill)
        return out

    def run(self) -> report.Verdict:
        try:
            self.setup()
            return self._run()
        finally:
            self.teardown()

    def _run(self) -> report.Verdict:
        plan = self.schedule()
        self.say(f"sending {self.o.n} notifications over ~{self.o.duration:.0f}s with {len(plan)} faults")
        caller = self.traffic()
        rng = random.Random(self.o.seed + 1)
        threads = []
        t0 = time.monotonic()
        self.started = t0
        self.started_wall = time.time()
        for at, kind in plan:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            threads.append(run_in_background(self, self.injectors()[kind], random.Random(rng.random())))
        caller.wait()
        for thread in threads:
            thread.join(timeout=120)
        self.ensure_services()
        self.restore_consumer_timeout(lowered=True)
        for proc in self.fleet.procs.values():
            if proc.name in ("beat2", "relay-loop"):
                continue
            if not proc.alive():
                proc.restart()
        faults_stopped = time.monotonic()
        self.say(f"traffic done in {faults_stopped - t0:.1f}s; draining")
        drained = self.drain()
        verdict = self.judge()
        verdict.report["drain_seconds"] = round(drained - faults_stopped, 1) if drained else None
        verdict.report["drained"] = drained is not None
        verdict.report["faults"] = dict(_count(f["kind"] for f in self.faults))
        calls = verdict.report["calls"]
        traffic = {
            "smtp_5xx": calls.get("bounce", 0),
            "poison": calls.get("poison", 0),
            "undecodable": calls.get("undecodable", 0),
            "oversized": calls.get("large", 0) + calls.get("oversized", 0) + calls.get("refused", 0),
        }
        for kind in TRAFFIC_FAULTS:
            if kind in self.o.faults:
                verdict.report["faults"][kind] = traffic[kind]
        verdict.report["fault_log"] = self.faults
        verdict.report["delivery_gap_after_fault_s"] = self.gaps_after_faults()
        verdict.report["setup"] = {
            "n": self.o.n,
            "duration": self.o.duration,
            "seed": self.o.seed,
            "workers": self.o.workers,
            "concurrency": self.o.concurrency,
            "settings": self.settings,
            "settings_changed": dict(self.o.changes) or "none: project/settings.py as shipped",
            "settings_added_for_the_traffic": {
                "NOTIFICATIONS_BACKENDS": self.backends(),
                "TEMPLATES[0]['DIRS']": "+ notifications/chaos/templates",
                "mail_server_listeners": self.mail.ports,
            },
            "rabbitmq_consumer_timeout": self.o.consumer_timeout or "the broker's own",
            "faults_selected": self.o.faults,
            "broker": self.o.broker,
        }
        if self.on_kafka:
            verdict.report["kafka"] = self.kafka_summary()
        if drained is None:
            verdict.failures.append(f"not drained within {self.o.drain_timeout:.0f}s after the faults stopped")
        verdict.failures += self.probe_failures
        if self.cluster is not None:
            verdict.report["cluster"] = self.cluster.summary()
        return verdict

    def kafka_summary(self) -> dict[str, Any]:
        own = self.kafka is not None
        out: dict[str, Any] = {
            "bootstrap": self.kafka_bootstrap,
            "broker": "the run's own Tansu (log in memory: a restart loses it), every client through a line "
            "the run can cut"
            if own
            else "given by --kafka-bootstrap: kafka_restart, kafka_cut and kafka_close skipped",
            "broker_restarts": self.kafka.restarts if own else 0,
            "topics": {k.removeprefix("NOTIFICATIONS_KAFKA_").lower(): v for k, v in self.topics.items()},
        }
        if self.kafka_line is not None:
            out["group"] = group_requests(self.kafka_line.group_requests, self.started_wall)
        return out

    def gaps_after_faults(self, window: float = 30.0) -> dict[str, float]:
        """Per fault kind, the longest time no email reached the mail server within
        ``window`` seconds of one of its faults while the caller was still sending: what
        the fault cost delivery (with steady traffic and faults far apart; overlapping
        faults share their gaps)."""
        arrivals = sorted(r.wall for r in self.mail.all_messages())
        calls = [json.loads(line)["at"] for line in self.calls_file.read_text().splitlines()]
        traffic_end = max(calls) if calls else 0.0  # after it, quiet is no gap
        out: dict[str, float] = {}
        for fault in self.faults:
            start = self.started_wall + fault["at"]
            inside = [t for t in arrivals if start - 1.0 <= t <= min(start + window, traffic_end)]
            if len(inside) < 2:
                continue
            gap = max(b - a for a, b in zip(inside, inside[1:], strict=False))
            out[fault["kind"]] = round(max(out.get(fault["kind"], 0.0), gap), 2)
        return dict(sorted(out.items()))

    def rate_buckets(self) -> set[str]:
        """The backends the pipeline wrote a rate bucket for (it enforced their rate)."""
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={self.database}") as conn:
            return {str(row[0]) for row in conn.execute("SELECT name FROM notifications_ratebucket")}

    def _snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], int]:
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={self.database}") as conn:
            notes = {
                row[0]: {
                    "status": row[1],
                    "ambiguous_count": row[2],
                    "last_error": row[3],
                    "sent_at": row[4].timestamp() if row[4] else None,
                    "updated_at": row[5].timestamp(),
                }
                for row in conn.execute(
                    "SELECT key, status, ambiguous_count, last_error, sent_at, updated_at "
                    "FROM notifications_notification"
                )
            }
            claims = {
                row[0]: {"state": row[1]} for row in conn.execute("SELECT key, state FROM notifications_sentemail")
            }
            row = conn.execute("SELECT count(*) FROM notifications_outboxmessage WHERE published_at IS NULL").fetchone()
            pending = row[0] if row else 0
        return notes, claims, int(pending)

    def _committed(self, existing: Any) -> set[str]:
        calls = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        return set(report.committed_calls(calls, existing))

    def note_victims(self, pids: list[int], fault: str) -> None:
        """Before a worker is killed, paused or cut off: the claims its pool processes
        hold now, whose takeover the report times."""
        owners = [f"{socket.gethostname()}:{pid}" for pid in pids]
        try:
            with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={self.database}") as conn:
                rows = conn.execute(
                    "SELECT key FROM notifications_sentemail WHERE state = 'claimed' AND owner = ANY(%s)", [owners]
                ).fetchall()
        except psycopg.Error:
            return
        at = time.time()
        with self.lock:
            self.victims += [{"key": row[0], "fault": fault, "at": at} for row in rows]

    def drain(self) -> float | None:
        deadline = time.monotonic() + self.o.drain_timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                notes, claims, pending = self._snapshot()
            except psycopg.Error:
                time.sleep(1)
                continue
            committed = self._committed(notes)
            open_keys = [k for k in committed if notes.get(k, {}).get("status") not in report.SETTLED_STATUSES]
            held = sum(1 for c in claims.values() if c["state"] == "claimed")
            status = f"{len(open_keys)} open, {held} claims held, {pending} unpublished"
            if status != last:
                self.say(f"  drain: {status}")
                last = status
            if not open_keys and not held and not pending:
                return time.monotonic()
            time.sleep(1)
        return None

    def judge(self) -> report.Verdict:
        calls = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        notes, claims, _ = self._snapshot()
        meta = json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}
        return report.judge(
            calls=calls,
            received=self.mail.all_messages(),
            notifications=notes,
            claims=claims,
            mode=self.o.mode,
            poison_expected="poison" in self.o.faults,
            victims=self.victims,
            takeover_limit=TAKEOVER_LIMIT,
            backends=self.backends(),
            rate_buckets=self.rate_buckets(),
            meta=meta,
        )


def _cluster_close(run: ChaosRun, rng: random.Random) -> str:
    closed = run.cluster.close_connections(run.vhost)
    return f"closed {closed} connection(s) on vhost {run.vhost} across the cluster"


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def group_requests(requests: list[tuple[float, str]], started: float) -> dict[str, Any]:
    """What the Kafka line saw of the consumer groups: JoinGroup, SyncGroup and LeaveGroup
    requests by kind, and the SyncGroup requests by second of the run (each member syncs
    once per generation: a burst of them is a rebalance; the run's consumers are its only
    group members, so every one is theirs)."""
    by_kind = _count(kind for _, kind in requests)
    syncs = Counter(int(at - started) for at, kind in requests if kind == "SyncGroup")
    # A rebalance: syncs within two seconds of each other count as one.
    rebalances, last = 0, None
    for second in sorted(syncs):
        if last is None or second - last > 2:
            rebalances += 1
        last = second
    return {
        "requests": dict(sorted(by_kind.items())),
        "rebalances": rebalances,
        "syncs_by_second": {str(k): v for k, v in sorted(syncs.items())},
    }
