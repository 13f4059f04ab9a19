"""The chaos run's mail server says which of its listeners accepted each message: how
the run checks that every email went through the backend its notification names."""

from __future__ import annotations

import smtplib
import socket
import time
from email.message import EmailMessage

from notifications.chaos import mailserver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(port: int, key: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", key
    msg["X-Notification-Key"] = key
    msg.set_content("hello")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg)


def test_each_listener_records_its_name_and_the_arrival_time() -> None:
    server = mailserver.start(_free_port(), listeners={"transactional": _free_port(), "bulk": _free_port()})
    try:
        before = time.time()
        for name, port in server.ports.items():
            _send(port, f"chaos:{name}:u1")
        for name in ("default", "transactional", "bulk"):
            (got,) = server.wait_received(f"chaos:{name}:u1", timeout=10)
            assert got.listener == name
            assert before <= got.wall <= time.time()
        assert sorted(server.ports) == ["bulk", "default", "transactional"]
    finally:
        server.stop()
