"""A real SMTP server (aiosmtpd) that records every message it accepts, with its
``Message-ID`` and ``X-Notification-Key``, and misbehaves on purpose.

Two kinds of misbehaviour: per-key plans (a reply, a hold, a drop for the next DATA of
one key: what a test pins down) and weather (for a while, a share of all DATA commands
get a 4xx, a dropped connection, or a reply slower than the client's timeout: what the
chaos run throws at the pipeline). Keys whose user id starts with ``bounce-`` are
rejected with a 5xx every time.

It may listen on several ports at once, each with a name (``listeners``): every message
records the listener that accepted it, so a run with several email backends, each pointed
at its own port, can tell which backend sent what.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

BOUNCE_MARKER = ":bounce-"
PERMANENT_REPLY = "550 5.1.1 Mailbox does not exist (bounce)"


@dataclass
class Received:
    key: str
    message_id: str
    to: list[str]
    message: Any
    at: float  # time.monotonic()
    wall: float  # time.time(), to compare with database timestamps
    peer: tuple[str, int] | None = None  # the client's address: one per SMTP connection
    listener: str = "default"  # the name of the port that accepted it


@dataclass
class Plan:
    """What the server does with the next DATA of a key: a reply code, a hold, or a drop."""

    reply: str | None = None  # e.g. "451 4.3.0 try again later"
    times: int = 1  # how many DATA commands this plan applies to (-1: always)
    hold: threading.Event | None = None  # wait until set before answering
    # With a hold: keep the message before holding the reply (the server has it, the
    # client has not heard so), or answer 421 without keeping it when the hold ends.
    keep: bool = True
    drop: bool = False  # close the connection without a reply
    hangup: bool = False  # accept, then close the connection (an idle client timed out)


@dataclass
class Weather:
    """Faults applied to a share of all DATA commands until ``until`` (monotonic)."""

    kind: str  # "4xx" | "drop" | "slow" | "hang"
    rate: float
    until: float
    delay: float = 0.0  # for slow / hang: seconds before the reply


class RecordingHandler:
    def __init__(self, seed: int = 0) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.received: list[Received] = []
        self.plans: dict[str, list[Plan]] = {}
        self.started: dict[str, int] = {}
        self.weather: list[Weather] = []
        self.faults: dict[str, int] = {}
        self.random = random.Random(seed)
        self.listeners: dict[int, str] = {}  # port -> name

    def _plan_for(self, key: str) -> Plan | None:
        with self.lock:
            plans = self.plans.get(key) or []
            if not plans:
                return None
            plan = plans[0]
            if plan.times > 0:
                plan.times -= 1
                if plan.times == 0:
                    plans.pop(0)
            return plan

    def _weather_now(self) -> Weather | None:
        now = time.monotonic()
        with self.lock:
            self.weather = [w for w in self.weather if w.until > now]
            for w in self.weather:
                if self.random.random() < w.rate:
                    self.faults[w.kind] = self.faults.get(w.kind, 0) + 1
                    return w
        return None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # The moment the server holds the whole message: what "arrived at" means for the
        # checks of send_at and expires_at, so it is taken before anything else.
        at, wall = time.monotonic(), time.time()
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        arrival = (at, wall, self._listener(server))
        key = str(msg.get("X-Notification-Key", "")).strip()
        with self.changed:
            self.started[key] = self.started.get(key, 0) + 1
            self.changed.notify_all()
        if BOUNCE_MARKER in key:
            return PERMANENT_REPLY
        plan = self._plan_for(key)
        if plan is not None:
            if plan.hold is not None:
                if plan.keep:
                    self._record(key, msg, envelope, session, arrival)
                while not plan.hold.is_set():
                    await asyncio.sleep(0.02)
                return "250 2.0.0 OK queued" if plan.keep else "421 4.3.0 closing without accepting"
            if plan.drop:
                server.transport.close()
                return "421 4.3.0 dropped"
            if plan.reply:
                return plan.reply
            if plan.hangup:
                self._record(key, msg, envelope, session, arrival)
                asyncio.get_running_loop().call_soon(server.transport.close)  # after the reply
                return "250 2.0.0 OK queued"
        weather = self._weather_now()
        if weather is not None:
            if weather.kind == "4xx":
                return "451 4.3.0 Temporary failure, try again later"
            if weather.kind == "drop":  # before the reply: nothing kept
                server.transport.close()
                return "421 4.3.0 dropped"
            # slow / hang: the message is kept, the reply comes after the client gave up
            self._record(key, msg, envelope, session, arrival)
            await asyncio.sleep(weather.delay)
            return "250 2.0.0 OK queued (late)"
        self._record(key, msg, envelope, session, arrival)
        return "250 2.0.0 OK queued"

    def _listener(self, server: Any) -> str:
        try:
            port = int(server.transport.get_extra_info("sockname")[1])
        except Exception:  # no transport (a handler driven by hand)
            return "default"
        return self.listeners.get(port, "default")

    def _record(
        self, key: str, msg: Any, envelope: Any, session: Any = None, arrival: tuple[float, float, str] | None = None
    ) -> None:
        at, wall, listener = arrival or (time.monotonic(), time.time(), "default")
        with self.changed:
            self.received.append(
                Received(
                    key=key,
                    message_id=str(msg.get("Message-ID", "")).strip(),
                    to=list(envelope.rcpt_tos),
                    message=msg,
                    at=at,
                    wall=wall,
                    peer=tuple(session.peer) if session is not None and session.peer else None,
                    listener=listener,
                )
            )
            self.changed.notify_all()


@dataclass
class MailServer:
    handler: RecordingHandler
    controller: Controller
    port: int
    extra: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # every listener: name -> port
    more: list[Controller] = field(default_factory=list)  # the controllers of the other listeners

    def messages(self, key: str) -> list[Received]:
        with self.handler.lock:
            return [r for r in self.handler.received if r.key == key]

    def all_messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def count(self, key: str) -> int:
        return len(self.messages(key))

    def plan(self, key: str, plan: Plan) -> Plan:
        with self.handler.lock:
            self.handler.plans.setdefault(key, []).append(plan)
        return plan

    def add_weather(self, kind: str, rate: float, seconds: float, delay: float = 0.0) -> None:
        with self.handler.lock:
            self.handler.weather.append(Weather(kind, rate, time.monotonic() + seconds, delay))

    def wait_started(self, key: str, times: int = 1, timeout: float = 20.0) -> None:
        """Wait until DATA for ``key`` has begun ``times`` times (a worker is mid-send)."""
        deadline = time.monotonic() + timeout
        with self.handler.changed:
            while self.handler.started.get(key, 0) < times:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no SMTP DATA for {key} within {timeout}s")
                self.handler.changed.wait(left)

    def wait_received(self, key: str, count: int = 1, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.handler.changed:
            while len([r for r in self.handler.received if r.key == key]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{key}: fewer than {count} message(s) received within {timeout}s")
                self.handler.changed.wait(left)
        return self.messages(key)

    def stop(self) -> None:
        for controller in self.more:
            controller.stop()
        self.controller.stop()


def start(port: int, seed: int = 0, listeners: dict[str, int] | None = None) -> MailServer:
    """A server on ``port`` (the listener ``"default"``) and on each port of ``listeners``
    (name -> port), all recording into one handler and sharing its plans and weather."""
    handler = RecordingHandler(seed)
    handler.listeners = {port: "default", **{p: name for name, p in (listeners or {}).items()}}
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    server = MailServer(handler=handler, controller=controller, port=port, ports={"default": port})
    try:
        for name, extra_port in (listeners or {}).items():
            more = Controller(handler, hostname="127.0.0.1", port=extra_port, ready_timeout=10)
            more.start()
            server.more.append(more)
            server.ports[name] = extra_port
    except BaseException:
        server.stop()
        raise
    return server
