"""A real SMTP server for tests (aiosmtpd), recording every message it accepts and
able to misbehave on purpose, per notification key."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    key: str
    message_id: str
    to: list[str]
    message: Any
    at: float


@dataclass
class Plan:
    """What the server does with the next DATA of a key: a reply code, a hold, or a drop."""

    reply: str | None = None  # e.g. "451 4.3.0 try again later"
    times: int = 1  # how many DATA commands this plan applies to (-1: always)
    hold: threading.Event | None = None  # wait until set before answering
    # With a hold: record the message before holding the reply (the server has it, the
    # client has not heard so), or answer 421 without keeping it when the hold ends.
    keep: bool = True
    drop: bool = False  # close the connection without a reply


class RecordingHandler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.plans: dict[str, list[Plan]] = {}
        self.started: dict[str, int] = {}
        self.changed = threading.Condition(self.lock)

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

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        key = str(msg.get("X-Notification-Key", "")).strip()
        with self.changed:
            self.started[key] = self.started.get(key, 0) + 1
            self.changed.notify_all()
        plan = self._plan_for(key)
        if plan is not None:
            if plan.hold is not None:
                if plan.keep:
                    self._record(key, msg, envelope)
                while not plan.hold.is_set():
                    await asyncio.sleep(0.02)
                return "250 2.0.0 OK queued" if plan.keep else "421 4.3.0 closing without accepting"
            if plan.drop:
                server.transport.close()
                return "421 4.3.0 dropped"
            if plan.reply:
                return plan.reply
        self._record(key, msg, envelope)
        return "250 2.0.0 OK queued"

    def _record(self, key: str, msg: Any, envelope: Any) -> None:
        with self.changed:
            self.received.append(
                Received(
                    key=key,
                    message_id=str(msg.get("Message-ID", "")).strip(),
                    to=list(envelope.rcpt_tos),
                    message=msg,
                    at=time.monotonic(),
                )
            )
            self.changed.notify_all()


@dataclass
class SMTPServer:
    handler: RecordingHandler
    controller: Controller
    port: int
    waiters: list[Callable[[], None]] = field(default_factory=list)

    def messages(self, key: str) -> list[Received]:
        with self.handler.lock:
            return [r for r in self.handler.received if r.key == key]

    def count(self, key: str) -> int:
        return len(self.messages(key))

    def plan(self, key: str, plan: Plan) -> Plan:
        with self.handler.lock:
            self.handler.plans.setdefault(key, []).append(plan)
        return plan

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


def start(port: int) -> SMTPServer:
    handler = RecordingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    return SMTPServer(handler=handler, controller=controller, port=port)
