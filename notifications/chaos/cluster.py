"""A three-node RabbitMQ cluster on loopback for the chaos run's cluster mode, and the
faults that stop or kill the node leading the delivery queue.

The nodes run beside the machine's own RabbitMQ and never meet it: their own node
names, AMQP and distribution ports, data, logs, plugins file, configuration and Erlang
cookie, all under one private directory that ``teardown()`` deletes. They are started
straight from ``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers switch to the
``rabbitmq`` user and its cookie, which is the machine node's).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import random

    from .run import ChaosRun

RABBITMQ_BIN = Path(os.environ.get("CHAOS_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
DELIVER_QUEUE = "notifications.deliver"
BASELINE = 10.0  # seconds before a fault whose longest gaps say what "no pause" looks like


def _free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on now, all different."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Node:
    """One RabbitMQ node of the cluster."""

    index: int
    name: str  # e.g. chaos-1-ab12cd-2@localhost
    port: int  # AMQP, on 127.0.0.1
    dist_port: int  # Erlang distribution, on 127.0.0.1
    dir: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbit.pid"

    @property
    def short(self) -> str:
        return f"node{self.index}"

    def url(self, vhost: str, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}"

    def os_pid(self) -> int | None:
        """The pid of the node's Erlang VM (``beam.smp``), from its pid file."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Pause:
    """What one leader fault did to the pipeline, measured from the chaos run's own
    records (the mail server's arrival times, the outbox's publish times)."""

    kind: str  # "stop" | "kill"
    node: str
    fault_at: float  # wall clock (time.time()) when the node was stopped or killed
    back_at: float  # wall clock when the node had rejoined
    delivery: float | None = None  # longest gap between SMTP arrivals across the fault
    publish: float | None = None  # longest gap between relay passes that published
    delivery_before: float | None = None  # the same gaps in the BASELINE seconds before
    publish_before: float | None = None
    new_leader: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "new_leader": self.new_leader,
            "down_seconds": round(self.back_at - self.fault_at, 1),
            "delivery_pause": None if self.delivery is None else round(self.delivery, 2),
            "publish_pause": None if self.publish is None else round(self.publish, 2),
            "baseline_delivery_gap": None if self.delivery_before is None else round(self.delivery_before, 2),
            "baseline_publish_gap": None if self.publish_before is None else round(self.publish_before, 2),
        }


@dataclass
class Cluster:
    """Three (``size``) RabbitMQ nodes clustered with each other, under ``workdir``.

    ``start()`` boots them, joins them and waits until all run; ``teardown()`` stops
    them and deletes their directories, whatever state they are in. Use it as a
    context manager, or call ``teardown()`` in a ``finally``.
    """

    workdir: Path
    tag: str  # part of the node names: one run's nodes never meet another run's
    size: int = 3
    consumer_timeout: float | None = None  # seconds; RabbitMQ's default (30 min) if None
    log: Callable[[str], None] = print
    nodes: list[Node] = field(default_factory=list)
    pauses: list[Pause] = field(default_factory=list)
    start_seconds: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.tag = "".join(ch if ch.isalnum() else "-" for ch in self.tag)
        self.home = self.workdir / "home"  # HOME: where the Erlang cookie lives
        ports = _free_ports(2 * self.size + 1)
        ctl = ports[-1] if ports[-1] < 65000 else 45672
        self.ctl_ports = (ctl, ctl + 10)
        for i in range(1, self.size + 1):
            self.nodes.append(
                Node(
                    index=i,
                    name=f"chaos-{self.tag}-{i}@localhost",
                    port=ports[2 * (i - 1)],
                    dist_port=ports[2 * (i - 1) + 1],
                    dir=self.workdir / f"node{i}",
                )
            )

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- files and environment --------------------------------------------------------------

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        # No plugins: the machine's node owns the management and Prometheus ports.
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        lines = ["log.console = false", "log.file.level = info", "loopback_users.guest = true"]
        if self.consumer_timeout is not None:
            lines.append(f"consumer_timeout = {int(self.consumer_timeout * 1000)}")
        (self.workdir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            # CLI tools take distribution ports from a range of their own (the default,
            # 35672-35682, is shared with every rabbitmqctl call to the machine's node).
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.ctl_ports[0]),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.ctl_ports[1]),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.dir / "log"),
                RABBITMQ_PID_FILE=str(node.pid_file),
                # One scheduler, no busy waiting: three nodes share two cores with the run.
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
            )
        return env

    # -- commands ---------------------------------------------------------------------------

    def ctl(
        self, node: Node, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl"
    ) -> subprocess.CompletedProcess[str]:
        """Run a RabbitMQ CLI tool against ``node`` (never raises on a non-zero exit)."""
        cmd = [str(RABBITMQ_BIN / tool), "-n", node.name, *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout}s: {exc}")

    def _must(self, node: Node, *args: str, timeout: float = 120.0) -> str:
        done = self.ctl(node, *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {done.stderr.strip() or done.stdout}")
        return done.stdout

    def running(self) -> list[Node]:
        """Nodes whose RabbitMQ application answers now."""
        return [n for n in self.nodes if n.alive() and self.ctl(n, "-q", "ping", timeout=15).returncode == 0]

    def _any_running(self, exclude: Node | None = None) -> Node:
        for node in self.nodes:
            if node is not exclude and node.alive() and _listening(node.port):
                return node
        raise RuntimeError("no cluster node is running")

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> float:
        """Boot every node, join nodes 2.. to node 1, wait until the cluster reports all
        of them running; return the seconds it took."""
        began = time.monotonic()
        self._write_files()
        for node in self.nodes:
            self._boot(node)
        for node in self.nodes:
            self._await_boot(node, began + timeout)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self._must(node, "-q", "stop_app")
            self._must(node, "-q", "join_cluster", first.name)
            self._must(node, "-q", "start_app")
        self._await_cluster(began + timeout)
        self.start_seconds = time.monotonic() - began
        self.log(
            f"RabbitMQ cluster of {self.size} up in {self.start_seconds:.1f}s: "
            + ", ".join(f"{n.name} :{n.port}" for n in self.nodes)
        )
        return self.start_seconds

    def _boot(self, node: Node) -> None:
        node.pid_file.unlink(missing_ok=True)
        log = open(node.dir / "stdout.log", "ab")  # noqa: SIM115 (owned by the child)
        node.popen = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self._env(node),
            cwd=node.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # teardown reaches the wrapper script and the VM
        )
        log.close()
        node.starts += 1

    def _await_boot(self, node: Node, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited while starting:\n{self._log_tail(node)}")
            if _listening(node.port) and self.ctl(node, "-q", "await_startup", timeout=30).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{node.name} did not start in time:\n{self._log_tail(node)}")

    def _log_tail(self, node: Node, lines: int = 20) -> str:
        """The end of a node's logs, for an error message (teardown deletes the files)."""
        text = []
        for path in sorted((node.dir / "log").glob("*.log")) + [node.dir / "stdout.log"]:
            try:
                text += [f"{path.name}: {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
            except OSError:
                pass
        return "\n".join(text[-lines:])

    def cluster_status(self, via: Node | None = None) -> dict[str, Any]:
        via = via or self._any_running()
        done = self.ctl(via, "-q", "cluster_status", "--formatter", "json", timeout=30)
        if done.returncode != 0:
            return {}
        try:
            return dict(json.loads(done.stdout))
        except ValueError:
            return {}

    def _await_cluster(self, deadline: float, via: Node | None = None) -> None:
        want = {n.name for n in self.nodes}
        while time.monotonic() < deadline:
            status = self.cluster_status(via)
            if set(status.get("running_nodes", [])) == want:
                return
            time.sleep(0.5)
        raise RuntimeError(f"cluster not fully running in time: {self.cluster_status(via)}")

    def add_vhost(self, vhost: str) -> None:
        """A vhost open to ``guest`` (the definitions replicate to every node)."""
        node = self._any_running()
        self._must(node, "-q", "add_vhost", vhost)
        self._must(node, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        self.ctl(self._any_running(), "-q", "delete_vhost", vhost)

    def summary(self) -> dict[str, Any]:
        """For the run's report: how long the cluster took to start, and every pause."""
        return {
            "nodes": [n.name for n in self.nodes],
            "start_seconds": None if self.start_seconds is None else round(self.start_seconds, 1),
            "pauses": [p.as_dict() for p in self.pauses],
        }

    def broker_url(self, vhost: str) -> str:
        """``CELERY_BROKER_URL`` for the project: every node, ';'-separated, so that
        kombu fails over from one to the next (round-robin)."""
        return ";".join(n.url(vhost) for n in self.nodes)

    def ensure_running(self, timeout: float = 180.0) -> list[Node]:
        """Start again any node that is not running (a fault that failed half-way);
        return the nodes it started."""
        started = [n for n in self.nodes if not n.alive()]
        for node in started:
            self._reap(node, grace=0.0)
            self.restart(node, timeout)
        return started

    def teardown(self) -> None:
        """Kill every node and delete the work dir, whatever state they are in (their
        data goes with the directory, so there is nothing to stop gracefully for)."""
        for node in self.nodes:
            self._reap(node, grace=0.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def close_connections(self, vhost: str, reason: str = "chaos: connections closed") -> int:
        """Close every client connection on ``vhost``, on every running node (what
        ``rabbit_close`` does to the machine's node). Returns how many nodes did it."""
        done = 0
        for node in self.nodes:
            if node.alive() and _listening(node.port):
                done += self.ctl(node, "-q", "close_all_connections", "--vhost", vhost, reason).returncode == 0
        return done

    def _reap(self, node: Node, grace: float = 10.0) -> None:
        """Wait ``grace`` seconds for the node to exit, then SIGKILL its VM and the
        wrapper script's process group, and reap the wrapper."""
        if node.popen is None:
            return
        if grace > 0 and node.popen.poll() is None:
            try:
                node.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_vm(node)
        if node.popen.poll() is None:  # the group is still ours while its leader runs
            try:
                os.killpg(node.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.popen.wait(timeout=30)

    def _kill_vm(self, node: Node) -> None:
        pid = node.os_pid()
        if pid is None:
            return
        try:  # a pid file outlives its process: kill only the VM that runs this node
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return
        if f"RABBITMQ_NODENAME={node.name}".encode() in environ:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- the queue and its leader -------------------------------------------------------------

    def queue_info(self, queue: str, vhost: str, via: Node | None = None) -> dict[str, Any] | None:
        """``{"leader": node name, "members": [...], "online": [...]}`` of a quorum
        queue, asked of a running node (``via``); None if it cannot say."""
        try:
            via = via or self._any_running()
        except RuntimeError:
            return None
        fields = ("name", "leader", "members", "online")
        done = self.ctl(via, "-q", "list_queues", "-p", vhost, *fields, "--formatter", "json", timeout=30)
        if done.returncode != 0:
            return None
        try:
            rows = json.loads(done.stdout)
        except ValueError:
            return None
        for row in rows:
            if row.get("name") == queue:
                return dict(row)
        return None

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def leader(self, vhost: str, queue: str = DELIVER_QUEUE) -> Node | None:
        """The node that leads ``queue`` now, or None if no leader is known."""
        info = self.queue_info(queue, vhost)
        if not info or not info.get("leader"):
            return None
        try:
            return self.node_named(str(info["leader"]))
        except StopIteration:
            return None

    def wait_members(self, vhost: str, queue: str = DELIVER_QUEUE, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``queue`` exists with a member on every node, all online."""
        deadline = time.monotonic() + timeout
        want = {n.name for n in self.nodes}
        info: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            info = self.queue_info(queue, vhost)
            if info and set(info.get("members", [])) == want and set(info.get("online", [])) == want:
                return info
            time.sleep(0.5)
        raise RuntimeError(f"{queue} on {vhost}: not a member on every node in time: {info}")

    # -- faults -------------------------------------------------------------------------------

    def stop(self, node: Node, timeout: float = 120.0) -> None:
        """Stop a node gracefully (``rabbitmqctl stop``: the app, then the VM), as a
        rolling restart or an operator does; wait until its process is gone."""
        self.ctl(node, "-q", "stop", timeout=timeout)
        self._reap(node, grace=timeout)

    def kill(self, node: Node) -> None:
        """SIGKILL the node's Erlang VM: what an OOM kill or a lost machine does."""
        self._kill_vm(node)
        self._reap(node, grace=10.0)

    def restart(self, node: Node, timeout: float = 180.0) -> float:
        """Start a stopped or killed node again and wait until it runs in the cluster
        (it rejoins by itself: its data directory remembers the cluster). Returns the
        seconds it took."""
        began = time.monotonic()
        if node.alive():
            raise RuntimeError(f"{node.name} is still running")
        self._boot(node)
        deadline = began + timeout
        self._await_boot(node, deadline)
        self._await_cluster(deadline, via=node)
        return time.monotonic() - began


# -- measuring the pause ------------------------------------------------------------------------


def longest_gap(times: Sequence[float], start: float, end: float) -> float | None:
    """The longest gap between consecutive ``times`` among those that overlap
    ``[start, end]``; None if nothing happened after ``start``.

    A gap overlaps when it begins before ``end`` and ends after ``start``: the gap
    that was under way when the fault struck counts whole, since nothing arrived in it.
    """
    ordered = sorted(times)
    best: float | None = None
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after > start and before < end:
            gap = after - before
            best = gap if best is None or gap > best else best
    return best


def _publish_times(run: ChaosRun, since: float) -> list[float]:
    """Wall times of the relay's successful passes since ``since`` (each pass stamps
    its rows with its transaction's start, ``now()``)."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={run.database}") as conn:
        rows = conn.execute(
            "SELECT DISTINCT extract(epoch FROM published_at)::float8 FROM notifications_outboxmessage "
            "WHERE published_at >= to_timestamp(%s)",
            [since],
        ).fetchall()
    return [float(r[0]) for r in rows]


def measure(run: ChaosRun, pause: Pause, settle: float = 30.0) -> Pause:
    """Fill in ``pause``: wait (at most ``settle`` seconds) until mail has arrived again
    after the node came back, then take the longest gap between SMTP arrivals, and
    between relay passes that published, across ``[fault_at, back_at]``, and the same
    in the ``BASELINE`` seconds before the fault for comparison."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        if any(r.wall > pause.back_at for r in run.mail.all_messages()):
            break
        time.sleep(0.5)
    since = pause.fault_at - BASELINE
    arrivals = [r.wall for r in run.mail.all_messages() if r.wall >= since]
    pause.delivery = longest_gap(arrivals, pause.fault_at, pause.back_at)
    pause.delivery_before = longest_gap([t for t in arrivals if t <= pause.fault_at], since, pause.fault_at)
    try:
        published = _publish_times(run, since)
    except Exception:  # the database may be the next fault's target; the mail gap stands
        return pause
    pause.publish = longest_gap(published, pause.fault_at, pause.back_at)
    pause.publish_before = longest_gap([t for t in published if t <= pause.fault_at], since, pause.fault_at)
    return pause


# -- injectors (shape of notifications.chaos.injectors: fn(run, rng) -> detail) ----------------


def _leader_fault(run: ChaosRun, rng: random.Random, kind: str) -> str:
    cluster: Cluster = run.cluster  # type: ignore[attr-defined]
    if not cluster.lock.acquire(blocking=False):
        return "skipped: another node fault is under way"
    try:
        leader = cluster.leader(run.vhost)
        if leader is None:
            return f"skipped: {DELIVER_QUEUE} has no known leader"
        fault_at = time.time()
        if kind == "stop":
            cluster.stop(leader)
        else:
            cluster.kill(leader)
        down_for = rng.uniform(2.0, 6.0)
        time.sleep(down_for)
        new = cluster.leader(run.vhost)
        cluster.restart(leader)
        pause = Pause(kind, leader.name, fault_at, time.time(), new_leader=new.name if new else None)
        measure(run, pause)
        cluster.pauses.append(pause)
    finally:
        cluster.lock.release()
    verb = "stopped (rabbitmqctl stop)" if kind == "stop" else "SIGKILLed"
    return (
        f"leader {leader.short} {verb}, new leader {new.short if new else '?'}, back after "
        f"{pause.back_at - fault_at:.1f}s; delivery paused {_s(pause.delivery)} (before: {_s(pause.delivery_before)}), "
        f"publishing {_s(pause.publish)} (before: {_s(pause.publish_before)})"
    )


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}s"


def rabbit_leader_stop(run: ChaosRun, rng: random.Random) -> str:
    """Stop the node that leads the delivery queue gracefully, start it again a few
    seconds later and wait until it has rejoined; measure the pause."""
    return _leader_fault(run, rng, "stop")


def rabbit_leader_kill(run: ChaosRun, rng: random.Random) -> str:
    """SIGKILL the node that leads the delivery queue, restart it a few seconds later
    and wait until it has rejoined; measure the pause."""
    return _leader_fault(run, rng, "kill")
