"""The benchmark's mail server: aiosmtpd in a process of its own, with a handler that
only notes each message's key and arrival time, so the sink is never what is measured
(its own ceiling is measured and printed beside the results).

The key is the ``X-Notification-Key`` header, or the ``Subject`` for a sender that
cannot set headers (the plain Celery peer calls ``send_mail``).

``python -m project.bench.sink --port P --n M`` is the ceiling client: M messages
over one reused connection, timed, as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import smtplib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpu import CpuProbe

MARKERS = (b"\nx-notification-key:", b"\nsubject:")


def message_key(data: bytes) -> str:
    """The message's key: its ``X-Notification-Key`` header, else its ``Subject``."""
    head = b"\n" + data.split(b"\r\n\r\n", 1)[0]
    lower = head.lower()
    for marker in MARKERS:
        at = lower.find(marker)
        if at >= 0:
            end = head.find(b"\n", at + len(marker))
            return head[at + len(marker) : end if end >= 0 else None].strip().decode("utf-8", "replace")
    return ""


class CountingHandler:
    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.arrivals: list[tuple[str, float]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrivals.append((message_key(envelope.original_content or b""), time.time()))
        self.counter.value += 1
        return "250 2.0.0 OK"


def _serve(port: int, counter: Any, control: Any) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = CountingHandler(counter)
    # An explicit hostname: aiosmtpd otherwise asks getfqdn() on every new connection,
    # which is the plain peer's one connection per email.
    loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, hostname="bench-sink.local", ident="bench sink", loop=loop),
            "127.0.0.1",
            port,
            backlog=1024,
        )
    )

    async def take() -> list[tuple[str, float]]:
        arrivals, handler.arrivals = handler.arrivals, []
        return arrivals

    def commands() -> None:
        while True:
            try:
                command = control.recv()
            except EOFError:
                break
            if command != "take":
                break
            control.send(asyncio.run_coroutine_threadsafe(take(), loop).result())
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=commands, daemon=True).start()
    control.send("ready")
    loop.run_forever()


@dataclass
class Sink:
    """The running sink: ``count`` (all messages so far) is read from shared memory, so
    polling it costs the server nothing; ``take()`` hands over the arrivals since the last call."""

    port: int
    process: Any = None
    counter: Any = None
    control: Any = None

    def start(self) -> Sink:
        ctx = multiprocessing.get_context("spawn")
        self.counter = ctx.RawValue("q", 0)
        self.control, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(self.port, self.counter, child), daemon=True)
        self.process.start()
        if not self.control.poll(30) or self.control.recv() != "ready":
            raise RuntimeError("the SMTP sink did not start")
        return self

    @property
    def count(self) -> int:
        return int(self.counter.value)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def take(self) -> list[tuple[str, float]]:
        self.control.send("take")
        return list(self.control.recv())

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.control.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def sample_message(i: int, key: str) -> bytes:
    """A message of the size and shape the benchmark sends (Django's SMTP backend output)."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = f"Your weekly summary #{i}"
    msg["From"] = "notifications@localhost"
    msg["To"] = f"user{i % 1000}@example.com"
    msg["Message-ID"] = f"<{i:064x}@notifications.local>"
    msg["X-Notification-Key"] = key
    msg.set_content(BODY)
    return msg.as_bytes()  # smtplib turns the line ends into CRLF


BODY = (
    "Hello,\n\nThis is a benchmark notification. It is about as long as a short transactional "
    "email: a greeting, two or three sentences, a link and a signature.\n\n"
    "https://example.com/notifications/settings\n\n-- \nThe notification service\n"
)


def ceiling(sink: Sink, n: int, clients: int, cwd: Path, say: Any = print) -> dict[str, Any]:
    """Messages per second the sink accepts from ``clients`` processes, each sending ``n``
    messages over one reused connection, all starting at the same moment."""
    start_at = time.time() + 2.0  # time for the clients to start and build their messages
    base = sink.count
    procs = [_spawn_client(sink.port, n, f"ceiling{clients}-{c}", start_at, cwd) for c in range(clients)]
    time.sleep(max(0.0, start_at - time.time()))
    cpu = CpuProbe(sink.pid)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"sink ceiling client failed: {err[-2000:]}")
        results.append(json.loads(out))
    sink.take()
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    total = sum(r["sent"] for r in results)
    rate = total / (end - start)
    say(f"  sink ceiling, {clients} connection(s): {total} messages in {end - start:.2f}s = {rate:,.0f}/s")
    return {
        "clients": clients,
        "messages": total,
        "accepted": sink.count - base,
        "seconds": round(end - start, 3),
        "per_second": round(rate, 1),
        "sink_cpu_percent": cpu.percent(),
    }


def _spawn_client(port: int, n: int, tag: str, start_at: float, cwd: Path) -> Any:
    import subprocess

    cmd = [sys.executable, "-m", "project.bench.sink", "--port", str(port), "--n", str(n)]
    cmd += ["--tag", tag, "--start-at", str(start_at)]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def client_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--tag", default="ceiling")
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    messages = [sample_message(i, f"sink:{args.tag}-{i}:u{i % 1000}") for i in range(args.n)]
    smtp = smtplib.SMTP("127.0.0.1", args.port, local_hostname="bench-client.local", timeout=30)
    smtp.ehlo()
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    start = time.time()
    for i, message in enumerate(messages):
        smtp.sendmail("notifications@localhost", [f"user{i % 1000}@example.com"], message)
    end = time.time()
    smtp.quit()
    print(json.dumps({"start": start, "end": end, "sent": len(messages)}))


if __name__ == "__main__":
    client_main()
