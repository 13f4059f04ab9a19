"""The fault matrix: one function per kind of fault, each doing to the running pipeline
what the real world would (signals, service commands, session kills, a misbehaving
mail server), and putting things back."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import ChaosRun

REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def sh(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def add_vhost(vhost: str) -> None:
    """A RabbitMQ vhost of the run's own, open to ``guest``."""
    sh("rabbitmqctl", "-q", "add_vhost", vhost)
    sh("rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def wait(predicate: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


@dataclass
class Injector:
    name: str
    node_wide: bool  # touches the whole service, not just this run's vhost / db
    fn: Callable[[ChaosRun, random.Random], str]


def _pick_worker(run: ChaosRun, rng: random.Random):  # type: ignore[no-untyped-def]
    with run.lock:
        idle = [w for w in run.fleet.workers() if w.name not in run.busy and w.alive()]
        if not idle:
            return None
        target = rng.choice(idle)
        run.busy.add(target.name)
        return target


def _release(run: ChaosRun, name: str) -> None:
    with run.lock:
        run.busy.discard(name)


def worker_kill(run: ChaosRun, rng: random.Random) -> str:
    target = _pick_worker(run, rng)
    if target is None:
        return "skipped: no idle worker"
    try:
        run.note_victims(target.children(), "worker_kill")
        target.kill()
        time.sleep(rng.uniform(0.2, 2.0))
        target.restart()
    finally:
        _release(run, target.name)
    return f"SIGKILL {target.name} (main and pool), restarted"


def child_kill(run: ChaosRun, rng: random.Random) -> str:
    target = _pick_worker(run, rng)
    if target is None:
        return "skipped: no idle worker"
    try:
        children = target.children()
        if not children:
            return f"skipped: {target.name} has no pool child"
        child = rng.choice(children)
        run.note_victims([child], "child_kill")
        subprocess.run(["kill", "-KILL", str(child)], capture_output=True)
        return f"SIGKILL pool child {child} of {target.name}"
    finally:
        _release(run, target.name)


def worker_term(run: ChaosRun, rng: random.Random) -> str:
    target = _pick_worker(run, rng)
    if target is None:
        return "skipped: no idle worker"
    try:
        target.signal_group(signal.SIGTERM)
        assert target.popen is not None
        try:
            target.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            target.kill()
        target.restart()
    finally:
        _release(run, target.name)
    return f"SIGTERM (warm shutdown) {target.name}, restarted"


def worker_stop(run: ChaosRun, rng: random.Random) -> str:
    """SIGSTOP a worker for longer than the claim lease: when it wakes, another worker may
    have taken over its claim, and its late writes must be refused by the fencing token."""
    target = _pick_worker(run, rng)
    if target is None:
        return "skipped: no idle worker"
    pause = run.lease + rng.uniform(2.0, 6.0)
    try:
        run.note_victims(target.children(), "worker_stop")
        target.signal_group(signal.SIGSTOP)
        time.sleep(pause)
        target.signal_group(signal.SIGCONT)
    finally:
        _release(run, target.name)
    return f"SIGSTOP {target.name} for {pause:.1f}s, then SIGCONT"


def beat_kill(run: ChaosRun, rng: random.Random) -> str:
    beat = run.fleet.procs["beat"]
    with run.lock:
        if "beat" in run.busy:
            return "skipped: beat busy"
        run.busy.add("beat")
    try:
        beat.kill()
        time.sleep(rng.uniform(0.5, 3.0))
        beat.restart()
    finally:
        _release(run, "beat")
    return "SIGKILL beat (relay schedule), restarted"


def dual_relay(run: ChaosRun, rng: random.Random) -> str:
    with run.lock:
        if "beat2" in run.busy:
            return "skipped: second relay already running"
        run.busy.add("beat2")
    try:
        second = run.fleet.beat("beat2")
        relay = run.fleet.add("relay-loop", ["-c", _RELAY_LOOP])
        time.sleep(rng.uniform(5.0, 10.0))
        second.stop()
        relay.stop()
    finally:
        _release(run, "beat2")
    return "second beat and a relay loop ran alongside for a while"


_RELAY_LOOP = (
    "import django, time; django.setup()\n"
    "from notifications.relay import drain\n"
    "while True:\n"
    "    drain(budget=2.0); time.sleep(0.05)\n"
)


def rabbit_close(run: ChaosRun, rng: random.Random) -> str:
    def restarting() -> bool:
        with run.lock:
            return "rabbit" in run.busy

    # While its app is stopped there is nothing to close (and rabbitmqctl refuses): close
    # the connections the clients open again once it is back.
    if restarting() and not wait(lambda: not restarting(), 60, step=0.2):
        return "skipped: RabbitMQ is still restarting"
    done = sh("rabbitmqctl", "-q", "close_all_connections", "--vhost", run.vhost, "chaos: connections closed")
    if done.returncode:
        return f"could not close the connections on vhost {run.vhost}: {(done.stderr or done.stdout).strip()[:200]}"
    return f"closed all connections on vhost {run.vhost} ({done.stdout.strip()})"


def rabbit_restart(run: ChaosRun, rng: random.Random) -> str:
    with run.lock:
        if "rabbit" in run.busy:
            return "skipped: already restarting"
        run.busy.add("rabbit")
    try:
        sh("rabbitmqctl", "-q", "stop_app")
        down = rng.uniform(2.0, 5.0)
        time.sleep(down)
        sh("rabbitmqctl", "-q", "start_app")
        wait(lambda: sh("rabbitmqctl", "-q", "await_startup").returncode == 0, 120)
        run.restore_consumer_timeout(lowered=True)
    finally:
        _release(run, "rabbit")
    return f"RabbitMQ app stopped for {down:.1f}s and started again"


def kafka_restart(run: ChaosRun, rng: random.Random) -> str:
    """Restart the run's Kafka broker (Tansu: its log is in memory, so topics, messages and
    the group's committed offsets are lost): what was published and not yet claimed must
    be published again by the recovery."""
    if run.kafka is None:
        return "skipped: the Kafka broker is not the run's own (--kafka-bootstrap), it cannot be restarted"
    with run.lock:
        if "kafka" in run.busy:
            return "skipped: Kafka busy"
        run.busy.add("kafka")
    try:
        down = rng.uniform(1.0, 4.0)
        run.kafka_line.drop()
        run.kafka.restart(down)
    finally:
        _release(run, "kafka")
    return f"Kafka broker stopped for {down:.1f}s and started again with an empty log (topics, messages, offsets lost)"


def _cut_for(run: ChaosRun, line: Any, busy: str, seconds: float, before: Callable[[], object] | None = None) -> bool:
    """Cut ``line`` for ``seconds`` and restore it, holding ``busy`` meanwhile so that no
    other fault takes the same service; False (nothing done) if another holds it."""
    with run.lock:
        if busy in run.busy:
            return False
        run.busy.add(busy)
    try:
        if before is not None:
            before()
        line.cut()
        time.sleep(seconds)
        line.restore()
    finally:
        _release(run, busy)
    return True


def kafka_cut(run: ChaosRun, rng: random.Random) -> str:
    """Cut every client's line to Kafka (packets taken, never answered) for up to twice
    the consumers' session timeout, then restore it: heartbeats stop, so the group may end
    its members and rebalance when they come back."""
    if run.kafka_line is None:
        return "skipped: the Kafka broker is not the run's own (--kafka-bootstrap), its line cannot be cut"
    seconds = rng.uniform(2.0, 12.0)
    if not _cut_for(run, run.kafka_line, "kafka", seconds):
        return "skipped: Kafka busy"
    return f"every Kafka connection (producer, consumers, admin) cut off for {seconds:.1f}s"


def kafka_close(run: ChaosRun, rng: random.Random) -> str:
    if run.kafka_line is None:
        return "skipped: the Kafka broker is not the run's own (--kafka-bootstrap), its connections cannot be closed"
    # While the line is cut or the broker restarting too: the clients see a reset on top.
    closed = run.kafka_line.drop()
    return f"closed all {closed} Kafka connection(s) (producer, consumers, admin)"


def redis_flush(run: ChaosRun, rng: random.Random) -> str:
    sh("redis-cli", "-n", str(run.redis_db), "flushdb")
    return f"FLUSHDB on Redis db {run.redis_db}"


def redis_restart(run: ChaosRun, rng: random.Random) -> str:
    with run.lock:
        if "redis" in run.busy:
            return "skipped: already restarting"
        run.busy.add("redis")
    try:
        sh("redis-cli", "shutdown", "nosave")
        down = rng.uniform(0.5, 3.0)
        time.sleep(down)
        sh(*REDIS_START)
        wait(lambda: sh("redis-cli", "ping").stdout.strip() == "PONG", 30, 0.2)
    finally:
        _release(run, "redis")
    return f"Redis server shut down for {down:.1f}s (keys lost) and restarted"


def pg_terminate(run: ChaosRun, rng: random.Random) -> str:
    done = sh(
        "psql",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atc",
        f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{run.database}' "
        "AND pid <> pg_backend_pid()",
    )
    return f"terminated {done.stdout.strip() or '?'} PostgreSQL sessions (workers, relays, caller)"


def pg_cut(run: ChaosRun, rng: random.Random) -> str:
    """Cut worker0's line to PostgreSQL (its packets are taken and never answered) for
    two to three leases, then restore it: its claims must lapse to the other workers,
    and its late writes meet the fencing token."""
    if run.line is None:
        return "skipped: no worker behind a line that can be cut"
    seconds = run.lease * rng.uniform(2.0, 3.0)
    victims = lambda: run.note_victims(run.fleet.procs["worker0"].children(), "pg_cut")  # noqa: E731
    if not _cut_for(run, run.line, "worker0", seconds, before=victims):
        return "skipped: worker0 busy"
    return f"worker0 cut off from PostgreSQL for {seconds:.1f}s"


def admin_probe(run: ChaosRun, rng: random.Random) -> str:
    """A view-only staff user tries every admin action on the failed, held and scheduled
    notifications of the moment (``notifications.chaos.admin_probe``); the run fails if
    anything changed."""
    import json
    import sys

    from .caller import CANCELLED_PREFIX
    from .run import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "notifications.chaos.admin_probe", "--skip", CANCELLED_PREFIX],
        cwd=ROOT,
        env=run.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        result = json.loads(done.stdout)
    except ValueError:
        run.probe_failures.append(f"the admin probe did not run: {done.stderr[-500:]}")
        return f"error: rc {done.returncode}"
    if result.get("changed"):
        run.probe_failures.append(f"a view-only admin user changed something: {json.dumps(result)[:1000]}")
    selected = result.get("selected", {})
    return f"view-only admin user tried every action on {selected}: changed={result.get('changed')}"


def _weather(kind: str, rate: float, delay: float = 0.0) -> Callable[[ChaosRun, random.Random], str]:
    def inject(run: ChaosRun, rng: random.Random) -> str:
        seconds = rng.uniform(2.0, 5.0)
        run.mail.add_weather(kind, rate, seconds, delay or run.slow_reply)
        return f"mail server: {kind} on {rate:.0%} of messages for {seconds:.1f}s"

    return inject


def smtp_hang(run: ChaosRun, rng: random.Random) -> str:
    seconds = rng.uniform(2.0, 4.0)
    run.mail.add_weather("hang", 0.2, seconds, run.hang_reply)
    return f"mail server: replies held {run.hang_reply:.0f}s (past the client's timeout) on 20% for {seconds:.1f}s"


INJECTORS: dict[str, Injector] = {
    i.name: i
    for i in [
        Injector("worker_kill", False, worker_kill),
        Injector("child_kill", False, child_kill),
        Injector("worker_term", False, worker_term),
        Injector("worker_stop", False, worker_stop),
        Injector("beat_kill", False, beat_kill),
        Injector("dual_relay", False, dual_relay),
        Injector("rabbit_close", False, rabbit_close),
        Injector("rabbit_restart", True, rabbit_restart),
        Injector("kafka_restart", False, kafka_restart),
        Injector("kafka_cut", False, kafka_cut),
        Injector("kafka_close", False, kafka_close),
        Injector("redis_flush", False, redis_flush),
        Injector("redis_restart", True, redis_restart),
        Injector("pg_terminate", False, pg_terminate),
        Injector("pg_cut", False, pg_cut),
        Injector("admin_probe", False, admin_probe),
        Injector("smtp_4xx", False, _weather("4xx", 0.5)),
        Injector("smtp_drop", False, _weather("drop", 0.3)),
        Injector("smtp_slow", False, _weather("slow", 0.2)),
        Injector("smtp_hang", False, smtp_hang),
    ]
}
# Not scheduled: always present in the caller's traffic when selected.
TRAFFIC_FAULTS = ("smtp_5xx", "poison", "undecodable", "oversized")
ALL_FAULTS = (*INJECTORS, *TRAFFIC_FAULTS)
# Faults of the Kafka delivery path: selected by "all" only with --broker kafka.
KAFKA_FAULTS = ("kafka_restart", "kafka_cut", "kafka_close")


def run_in_background(run: ChaosRun, injector: Injector, rng: random.Random) -> threading.Thread:
    def target() -> None:
        started = time.monotonic()
        try:
            detail = injector.fn(run, rng)
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            detail = f"error: {exc!r}"
        run.record_fault(injector.name, started, detail)

    thread = threading.Thread(target=target, name=f"fault-{injector.name}", daemon=True)
    thread.start()
    return thread
