"""A Django email backend that sends each email to an HTTP API, built as django-anymail's
requests-based backends are: ``open()`` makes a session whose ``headers`` go on every
request, and each email is one POST of JSON. With it (and ``tests.http_backend.start``,
a real HTTP server that records what it is sent), the tests see what an API provider
receives with ``IDEMPOTENCY_IN = "request"``."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from django.core.mail.backends.base import BaseEmailBackend


class Session:
    """What the backend keeps open between emails: its headers, as ``requests.Session``'s."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {"User-Agent": "tests-http-backend"}


class EmailBackend(BaseEmailBackend):
    def __init__(self, url: str = "", timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.timeout = url, timeout
        self.session: Session | None = None

    def open(self) -> bool:
        if self.session is not None:
            return False
        self.session = Session()
        return True

    def close(self) -> None:
        self.session = None

    def send_messages(self, email_messages: Any) -> int:
        assert self.session is not None, "send_messages() before open()"
        for message in email_messages:
            body = {"to": message.to, "subject": message.subject, "headers": dict(message.extra_headers)}
            request = urllib.request.Request(
                self.url, data=json.dumps(body).encode(), headers=dict(self.session.headers), method="POST"
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        return len(email_messages)


@dataclass
class Request:
    headers: dict[str, str]  # by lower-case name
    body: dict[str, Any]


@dataclass
class APIServer:
    server: ThreadingHTTPServer
    received: list[Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/emails"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start() -> APIServer:
    """A real HTTP server on a free loopback port that answers 200 and keeps every request."""
    api: APIServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            api.received.append(
                Request({k.lower(): v for k, v in self.headers.items()}, json.loads(self.rfile.read(length)))
            )
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    api = APIServer(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    threading.Thread(target=api.server.serve_forever, daemon=True).start()
    return api
