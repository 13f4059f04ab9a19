"""The pipeline's processes for a chaos run, each in its own process group so that a
kill reaches the whole of it (a worker's main process and its pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        handle = open(self.log, "ab")  # noqa: SIM115 (owned by the child)
        self.popen = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def children(self) -> list[int]:
        if not self.alive():
            return []
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            self.signal_group(signal.SIGKILL)
            return
        self.signal_group(signal.SIGCONT)
        self.signal_group(signal.SIGTERM)
        try:
            assert self.popen is not None
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=30)

    def restart(self) -> None:
        self.restarts += 1
        self.start()


@dataclass
class Fleet:
    root: Path
    env: dict[str, str]
    logs: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def add(self, name: str, args: list[str], **env: str) -> Proc:
        proc = Proc(
            name=name,
            cmd=[sys.executable, *args],
            env={**self.env, **env},
            cwd=self.root,
            log=self.logs / f"{name}.log",
        )
        self.procs[name] = proc
        proc.start()
        return proc

    def worker(self, name: str, concurrency: int, **env: str) -> Proc:
        return self.add(
            name,
            [
                "-m",
                "celery",
                "-A",
                "project",
                "worker",
                "-l",
                "info",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--without-mingle",
                "--without-gossip",
                "-Q",
                # Every queue a worker consumes unless told (notifications.broker.queues()).
                "notifications.deliver.high,notifications.deliver,notifications.relay",
            ],
            **env,
        )

    def beat(self, name: str = "beat") -> Proc:
        schedule = self.logs / f"{name}-schedule"
        return self.add(name, ["-m", "celery", "-A", "project", "beat", "-l", "info", "-s", str(schedule)])

    def workers(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n.startswith("worker")]

    def wait_ready(self, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in proc.log.read_text(errors="replace"):
                return
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: see {proc.log}")
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} not ready within {timeout}s: see {proc.log}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop(timeout=20)


def migrate(root: Path, env: dict[str, str]) -> None:
    """``manage.py migrate`` in a child process: settings are read once per process, so
    the run's database is named in ``env``."""
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"], cwd=root, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stderr[-2000:]}")
