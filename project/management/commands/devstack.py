"""``manage.py devstack``: the whole pipeline on one machine, for local use.

Checks that PostgreSQL, Redis and RabbitMQ answer, creates and migrates the database,
creates its own RabbitMQ vhost (``notifications-dev``, unless ``CELERY_BROKER_URL`` is
set), resets a local ``admin`` superuser, then runs the web server, a worker, beat, Flower
(with the queues, from RabbitMQ's management API) and a printing SMTP server as child
processes with prefixed output, until Ctrl-C. ``--teardown`` removes what it created.
``--broker kafka`` puts the delivery path on Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` if set,
else a local noida-db broker on 127.0.0.1:9092 (project/kafkabroker.py, data in
``.devstack/kafka``) that lives as long as the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from notifications import broker, health
from notifications.conf import settings as app_settings
from project import devbroker, kafkabroker

WEB = ("127.0.0.1", 8000)
FLOWER = ("127.0.0.1", 5555)
METRICS_PORTS = {"worker": 9101, "beat": 9102}  # their metrics servers; the web's is /metrics
SMTP_PORT = 1025
KAFKA_PORT = 9092  # Kafka's own, so that a client on this machine finds it without settings
STOP_TIMEOUT = 10.0
CHECK_TIMEOUT = 3.0

# Lines that repeat every relay pass (once a second) and would bury everything else.
RELAY_NOISE = (
    "Sending due task notifications-relay",
    "Task notifications.relay[",
)

COLOURS = ("36", "33", "32", "35", "34", "31")

# How to start each service, and the variable that points elsewhere instead.
START_HINTS = {
    "PostgreSQL": (
        [
            "sudo systemctl start postgresql",
            "without systemd: sudo pg_ctlcluster <version> main start",
            "macOS: brew services start postgresql@16",
        ],
        "DATABASE_URL",
    ),
    "Redis": (
        [
            "sudo systemctl start redis-server",
            "without systemd: redis-server --daemonize yes",
            "macOS: brew services start redis",
        ],
        "REDIS_URL",
    ),
    "RabbitMQ": (
        [
            "sudo systemctl start rabbitmq-server",
            "without systemd: sudo rabbitmq-server -detached",
            "macOS: brew services start rabbitmq",
        ],
        "CELERY_BROKER_URL",
    ),
}


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    colour: str = ""
    proc: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None


class Command(BaseCommand):
    help = (
        "Run the whole pipeline locally: web (admin), worker, beat, Flower and a printing SMTP "
        "server, after checking the services and migrating. For local use only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-smtp", action="store_true", help="Do not run the local SMTP server.")
        parser.add_argument("--no-flower", action="store_true", help="Do not run Flower.")
        parser.add_argument(
            "--broker",
            choices=["rabbitmq", "kafka"],
            default=os.environ.get("NOTIFICATIONS_BROKER") or "rabbitmq",
            help="The delivery path's broker (default rabbitmq, or NOTIFICATIONS_BROKER). With kafka, a local "
            "Kafka broker runs unless KAFKA_BOOTSTRAP_SERVERS names one; Celery's own tasks stay on RabbitMQ.",
        )
        parser.add_argument("--concurrency", type=int, default=2, metavar="N", help="Worker processes (default 2).")
        parser.add_argument(
            "--verbose-relay",
            action="store_true",
            help="Show the once-a-second relay pass log lines too.",
        )
        parser.add_argument(
            "--teardown",
            action="store_true",
            help="Remove what earlier runs created (database, vhost, Redis keys, .devstack/) and exit.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # Re-entrant: the signal handler may print while the main thread is printing.
        self.out_lock = threading.RLock()
        self.state_dir = Path(settings.BASE_DIR) / ".devstack"
        self.broker_url, self.own_vhost = devbroker.dev_url(dict(os.environ))
        if options["teardown"]:
            self.teardown()
            return
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        self.kafka: kafkabroker.Broker | None = None
        try:
            self.run_stack(options)
        finally:
            self.stop_kafka()

    def run_stack(self, options: dict[str, Any]) -> None:
        smtp_port = int(os.environ.get("EMAIL_PORT") or SMTP_PORT)
        self.state_dir.mkdir(exist_ok=True)
        self.check_services()
        self.check_ports(
            [WEB[1]] + ([] if options["no_flower"] else [FLOWER[1]]) + ([] if options["no_smtp"] else [smtp_port])
        )
        kafka_bootstrap = self.start_kafka() if options["broker"] == "kafka" else ""
        if self.ensure_database():
            self.record(database=self._database_record())
        self.say("Migrating the database")
        call_command("migrate", interactive=False, verbosity=1)
        password = secrets.token_urlsafe(12)
        self.reset_admin(password)
        flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"admin:{password}"

        state_dir = self.state_dir
        env = dict(os.environ)
        env["CELERY_BROKER_URL"] = self.broker_url
        # Flower reads the queues from the management API; told through the environment
        # (Flower's FLOWER_* options), so the password stays out of the command line.
        wants_api = not options["no_flower"] and "FLOWER_BROKER_API" not in env
        if wants_api and devbroker.enable_management(self.broker_url, self.say):
            env["FLOWER_BROKER_API"] = devbroker.api_url(self.broker_url)
            self.say(f"Flower reads the queues from {_safe_url(env['FLOWER_BROKER_API'])}")
        env.setdefault("DJANGO_DEBUG", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env["EMAIL_PORT"] = str(smtp_port)
        if not options["no_smtp"] or not env.get("EMAIL_HOST"):
            env["EMAIL_HOST"] = "127.0.0.1"
        env["FLOWER_BASIC_AUTH"] = flower_auth
        env["NOTIFICATIONS_BROKER"] = options["broker"]
        if kafka_bootstrap:
            # Every child: worker and beat deliver over it, web's dashboard reads its backlog.
            env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap

        # Worker and beat serve their counters (README, "Metrics"); the worker's pool
        # processes write theirs to a directory of its own, cleared when it starts.
        worker_env = {**env, "NOTIFICATIONS_METRICS_PORT": str(METRICS_PORTS["worker"])}
        worker_env["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir / "metrics-worker")
        beat_env = {**env, "NOTIFICATIONS_METRICS_PORT": str(METRICS_PORTS["beat"])}
        python = sys.executable
        celery = [python, "-m", "celery", "-A", "project"]
        # Both delivery queues (priority="high" travels in a queue of its own) and the relay's.
        queues = ",".join([*broker.delivery_queue_names(), str(app_settings.RELAY_QUEUE)])
        children = [
            Child("web", [python, "manage.py", "runserver", f"{WEB[0]}:{WEB[1]}"], env),
            Child(
                "worker",
                [*celery, "worker", "-l", "info", "-c", str(options["concurrency"]), "-Q", queues],
                worker_env,
            ),
            Child(
                "beat",
                [*celery, "beat", "-l", "info", "-s", str(state_dir / "celerybeat-schedule")],
                beat_env,
            ),
        ]
        if not options["no_flower"]:
            children.append(
                Child(
                    "flower",
                    [*celery, "flower", f"--address={FLOWER[0]}", f"--port={FLOWER[1]}"],
                    env,
                )
            )
        if not options["no_smtp"]:
            children.append(Child("smtp", [python, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}"], env))

        banner = self.banner(password, flower_auth, env, options)
        connections.close_all()  # the children have their own; ours would idle for hours
        code = Supervisor(children, self.write, quiet_relay=not options["verbose_relay"]).run(
            cwd=Path(settings.BASE_DIR),
            on_ready=lambda: self.write(banner),
            ready_ports=self.ready_ports(options),
        )
        if code:
            raise CommandError("a process exited unexpectedly; everything was stopped", returncode=code)

    # Start-up steps -----------------------------------------------------------

    def check_services(self) -> None:
        """Fail with one message naming every service that does not answer."""
        problems = [p for p in (self._check_postgres(), self._check_redis(), self._check_rabbitmq()) if p]
        if problems:
            raise CommandError("\n\n".join(["Some services do not answer:", *problems]))
        self.say("PostgreSQL, Redis and RabbitMQ answer")

    def _check_postgres(self) -> str:
        import psycopg

        db = settings.DATABASES["default"]
        try:
            psycopg.connect(**{"connect_timeout": int(CHECK_TIMEOUT), **self._pg_params("postgres")}).close()
        except psycopg.OperationalError as exc:
            where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"
            return _down("PostgreSQL", where, exc)
        return ""

    def _check_redis(self) -> str:
        import redis

        try:
            health.check_redis(CHECK_TIMEOUT)
        except redis.RedisError as exc:
            return _down("Redis", _safe_url(app_settings.REDIS_URL), exc)
        return ""

    def _check_rabbitmq(self) -> str:
        from amqp.exceptions import NotAllowed

        url = self.broker_url
        try:
            try:
                health.check_rabbitmq(CHECK_TIMEOUT, url)
            except NotAllowed:  # the server answers; the vhost is missing
                if not self.own_vhost:
                    raise
                if devbroker.ensure_vhost(url):
                    self.record(vhost=devbroker.vhost_of(url))
                    self.say(f"Created RabbitMQ vhost {devbroker.vhost_of(url)}")
                health.check_rabbitmq(CHECK_TIMEOUT, url)
        except devbroker.BrokerSetupError as exc:
            return str(exc)
        except Exception as exc:  # kombu raises transport-specific errors
            return _down("RabbitMQ", _safe_url(url), exc)
        return ""

    def check_ports(self, ports: list[int]) -> None:
        busy = []
        for port in ports:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(port)
        if busy:
            raise CommandError(
                f"Port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use (another devstack?). "
                "Stop what holds them, or use --no-flower / --no-smtp / EMAIL_PORT."
            )

    def _pg_params(self, dbname: str) -> dict[str, Any]:
        db = settings.DATABASES["default"]
        params = {
            "dbname": dbname,
            "host": db.get("HOST") or None,
            "port": db.get("PORT") or None,
            "user": db.get("USER") or None,
            "password": db.get("PASSWORD") or None,
        }
        params.update({k: v for k, v in (db.get("OPTIONS") or {}).items() if isinstance(v, (str, int))})
        return {k: v for k, v in params.items() if v is not None}

    def ensure_database(self) -> bool:
        """Create the database named in DATABASE_URL if it does not exist yet; True if
        it was created here."""
        import psycopg
        from psycopg import errors, sql

        name = settings.DATABASES["default"]["NAME"]
        with psycopg.connect(**self._pg_params("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                return False
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except errors.DuplicateDatabase:  # created meanwhile by someone else
                return False
        self.say(f"Created database {name}")
        return True

    def start_kafka(self) -> str:
        """The Kafka the pipeline delivers over: ``KAFKA_BOOTSTRAP_SERVERS`` if set (it must
        answer), else a noida-db broker started here on 127.0.0.1:9092, its data in
        ``.devstack/kafka`` (kept between runs, like the database), stopped by stop_kafka()."""
        given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if given:
            if not kafkabroker.answers(given, CHECK_TIMEOUT, getattr(settings, "NOTIFICATIONS_KAFKA_CONFIG", None)):
                raise CommandError(
                    f"Kafka at {given} (KAFKA_BOOTSTRAP_SERVERS) does not answer within {CHECK_TIMEOUT:.0f}s: start "
                    "it, or unset KAFKA_BOOTSTRAP_SERVERS and a local broker runs."
                )
            self.say(f"Kafka answers at {given}")
            return given
        data_dir = self.state_dir / "kafka"
        # A devstack killed outright (SIGKILL, a closed terminal) leaves its broker running.
        if kafkabroker.stop_pid_file(data_dir / kafkabroker.PID_FILE):
            self.say("Stopped the Kafka broker an earlier run left running")
        try:
            self.kafka = kafkabroker.start(KAFKA_PORT, data_dir, engine="noida")  # its data kept in .devstack
        except kafkabroker.BrokerError as exc:
            raise CommandError(f"{exc}\n  or point KAFKA_BOOTSTRAP_SERVERS at a running Kafka.") from exc
        self.say(f"Started a Kafka broker (noida-db) on {self.kafka.bootstrap}, data in {data_dir}")
        return self.kafka.bootstrap

    def stop_kafka(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
            self.say("Kafka broker stopped (its data stays in .devstack/kafka)")

    # What this command created, for --teardown ----------------------------------

    @property
    def record_file(self) -> Path:
        return self.state_dir / "created.json"

    def created(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.record_file.read_text()))
        except (OSError, ValueError):
            return {}

    def record(self, **what: Any) -> None:
        self.state_dir.mkdir(exist_ok=True)
        self.record_file.write_text(json.dumps({**self.created(), **what}, indent=2))

    def _database_record(self) -> dict[str, Any]:
        db = settings.DATABASES["default"]
        return {"name": db["NAME"], "host": db.get("HOST") or "", "port": str(db.get("PORT") or "")}

    def teardown(self) -> None:
        """Drop the database and delete the vhost that earlier runs created (and only
        those), delete the app's Redis keys, and remove ``.devstack/``."""
        import psycopg
        from psycopg import sql

        if _answers(WEB):
            raise CommandError(f"Something answers on {WEB[0]}:{WEB[1]}: stop the running devstack first (Ctrl-C).")
        created = self.created()
        database = created.get("database")
        if database and database != self._database_record():
            self.say(f"Left database {database['name']}: DATABASE_URL now points elsewhere ({self._database_record()})")
        elif database:
            with psycopg.connect(**self._pg_params("postgres"), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database["name"]))
                )
            self.say(f"Dropped database {database['name']}")
        else:
            self.say(f"Left database {settings.DATABASES['default']['NAME']} as it is: no run recorded creating it")
        vhost = created.get("vhost")
        if vhost:
            url = devbroker.DEFAULT_URL + quote(vhost, safe="")
            if devbroker.delete_vhost(url):
                self.say(f"Deleted RabbitMQ vhost {vhost}")
            else:
                self.say(f"Could not delete RabbitMQ vhost {vhost}: run 'sudo rabbitmqctl delete_vhost {vhost}'")
        else:
            self.say(f"Left RabbitMQ vhost {devbroker.vhost_of(self.broker_url)} as it is: no run recorded creating it")
        deleted = self.delete_redis_keys()
        self.say(
            f"Deleted {deleted} Redis key(s) {app_settings.REDIS_KEY_PREFIX}* in {_safe_url(app_settings.REDIS_URL)}"
        )
        if kafkabroker.stop_pid_file(self.state_dir / "kafka" / kafkabroker.PID_FILE):
            self.say("Stopped the Kafka broker an earlier run left running")
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            self.say(f"Removed {self.state_dir}")

    def delete_redis_keys(self) -> int:
        import redis

        client = redis.Redis.from_url(app_settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT)
        try:
            keys = list(client.scan_iter(match=f"{app_settings.REDIS_KEY_PREFIX}*", count=1000))
            return int(client.delete(*keys)) if keys else 0
        except redis.RedisError as exc:
            self.say(f"Could not delete the Redis keys: {exc}")
            return 0
        finally:
            client.close()

    def reset_admin(self, password: str) -> None:
        from django.contrib.auth import get_user_model

        user_model = get_user_model()
        user, _ = user_model._default_manager.get_or_create(
            **{user_model.USERNAME_FIELD: "admin"}, defaults={"email": "admin@localhost"}
        )
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
        self.say("Superuser 'admin' has a new password (see below)")

    # Output -------------------------------------------------------------------

    def ready_ports(self, options: dict[str, Any]) -> list[tuple[str, int]]:
        return [WEB] + ([] if options["no_flower"] else [FLOWER])

    def banner(self, password: str, flower_auth: str, env: dict[str, str], options: dict[str, Any]) -> str:
        rule = "=" * 78
        lines = [
            rule,
            "  Notifications devstack (local use only)",
            "",
            f"  Admin   http://{WEB[0]}:{WEB[1]}/admin/   login: admin / {password}",
        ]
        if not options["no_flower"]:
            login = flower_auth.replace(":", " / ", 1)
            lines.append(f"  Flower  http://{FLOWER[0]}:{FLOWER[1]}/   login: {login}")
        lines.append(f"  Broker  {_safe_url(self.broker_url)}")
        if env.get("NOTIFICATIONS_BROKER") == "kafka":
            lines.append(f"  Kafka   {env['KAFKA_BOOTSTRAP_SERVERS']} (deliveries; Celery's tasks: the broker above)")
        ports = f"worker :{METRICS_PORTS['worker']}, beat :{METRICS_PORTS['beat']}"
        lines.append(f"  Metrics http://{WEB[0]}:{WEB[1]}/metrics, {ports}")
        if options["no_smtp"]:
            lines.append(f"  Mail    sent to {env['EMAIL_HOST']}:{env['EMAIL_PORT']}")
        else:
            lines.append(f"  Mail    printed below by 'smtp' (SMTP server on 127.0.0.1:{env['EMAIL_PORT']})")
        lines += [
            "",
            "  Try it, in another terminal:",
            '  .venv/bin/python manage.py shell -c "from notifications import notify; '
            "notify(service='demo', notification_id='1', user_id='42', to='ann@example.com', "
            "subject='Hello', body='It works')\"",
            "",
            "  Ctrl-C stops everything; 'make clean-dev' then removes what this created.",
            rule,
        ]
        return "\n".join(lines)

    def say(self, message: str) -> None:
        self.write(f"devstack | {message}")

    def write(self, text: str) -> None:
        with self.out_lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


class Supervisor:
    """Run children in their own process groups, prefix their output, and stop them all
    together: on Ctrl-C / SIGTERM, or as soon as one of them exits on its own."""

    def __init__(self, children: list[Child], write: Callable[[str], None], quiet_relay: bool) -> None:
        self.children = children
        self.write = write
        self.quiet_relay = quiet_relay
        self.stopping = threading.Event()
        self.signals = 0
        self.width = max(len("devstack"), *(len(c.name) for c in children))
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        for index, child in enumerate(children):
            child.colour = COLOURS[index % len(COLOURS)] if colour else ""

    def run(self, cwd: Path, on_ready: Callable[[], None], ready_ports: list[tuple[str, int]]) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._start(child, cwd)
            threading.Thread(target=self._announce, args=(on_ready, ready_ports), daemon=True).start()
            return self._watch()
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        self.stopping.set()
        if self.signals > 1:
            self._say("second signal: killing everything")
            for child in self.children:
                _killpg(child, signal.SIGKILL)

    def _start(self, child: Child, cwd: Path) -> None:
        child.proc = subprocess.Popen(
            child.argv,
            cwd=cwd,
            env=child.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own process group: the terminal's Ctrl-C reaches only us, and we stop
            # each child's whole tree (runserver's reloader, the worker's pool) in order.
            start_new_session=True,
        )
        assert child.proc.stdout is not None
        child.reader = threading.Thread(target=self._pump, args=(child, child.proc.stdout), daemon=True)
        child.reader.start()
        command = " ".join(_short(a) for a in child.argv)
        self._say(f"started {child.name} (pid {child.proc.pid}): {command}")

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        prefix = f"{child.name:<{self.width}} | "
        if child.colour:
            prefix = f"\033[{child.colour}m{prefix}\033[0m"
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if self.quiet_relay and any(noise in line for noise in RELAY_NOISE):
                continue
            self.write(prefix + line)

    def _announce(self, on_ready: Callable[[], None], ports: list[tuple[str, int]]) -> None:
        deadline = time.monotonic() + 60
        pending = list(ports)
        while pending and time.monotonic() < deadline and not self.stopping.is_set():
            pending = [p for p in pending if not _answers(p)]
            if pending:
                time.sleep(0.2)
        if not self.stopping.is_set():
            on_ready()

    def _watch(self) -> int:
        while not self.stopping.wait(0.2):
            for child in self.children:
                assert child.proc is not None
                code = child.proc.poll()
                if code is not None:
                    self._say(f"{child.name} exited unexpectedly with code {code}; stopping the others")
                    return code if code > 0 else 1
        self._say("stopping")
        return 0

    def stop_all(self) -> None:
        """Terminate every child, wait, then kill what is left of each process group."""
        running = [c for c in self.children if c.proc is not None]
        for child in running:
            # The leader only: a worker's warm shutdown stops its own pool, and killing
            # pool processes behind its back would count as lost workers.
            assert child.proc is not None
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"{child.name} did not stop in {STOP_TIMEOUT:.0f}s; killing it")
        for child in running:
            # Also reaps grandchildren that outlived their parent (runserver's reloader child).
            _killpg(child, signal.SIGKILL)
            assert child.proc is not None
            child.proc.wait()
            if child.reader is not None:
                child.reader.join(timeout=2)
        self._say("all processes stopped")

    def _say(self, message: str) -> None:
        self.write(f"{'devstack':<{self.width}} | {message}")


def _killpg(child: Child, sig: int) -> None:
    if child.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, sig)


def _answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def _short(arg: str) -> str:
    return "python" if arg == sys.executable else arg


def _down(service: str, where: str, exc: BaseException) -> str:
    commands, variable = START_HINTS[service]
    lines = [f"{service} at {where} is not reachable: {_first_line(exc)}", "  start it with:"]
    lines += [f"    {command}" for command in commands]
    lines.append(f"  or point {variable} at a running server.")
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
