"""Flower behind authentication: ``celery -A project flower`` listens on 127.0.0.1 unless
told otherwise, refuses any other address without ``FLOWER_BASIC_AUTH``, and asks for
the same credentials on ``/metrics`` as on every other page.

Flower gathers its options from three places (``FLOWER_*`` environment variables,
``flowerconfig.py``, the command line), so the check runs where they have all been
applied: just before Flower binds its HTTP socket.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any

logger = logging.getLogger("project.flower")

DEFAULT_ADDRESS = "127.0.0.1"


class FlowerAuthRequired(Exception):
    """Flower would listen beyond this machine without authentication."""


def invoked(argv: list[str]) -> bool:
    """True when the celery command line runs the ``flower`` subcommand."""
    return "flower" in argv[1:]


def is_loopback(address: str) -> bool:
    """True if every address ``address`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def has_auth(options: Any) -> bool:
    """Basic auth with at least one complete ``user:password`` pair, or Flower's OAuth."""
    pairs = [p for p in (options.basic_auth or []) if p]
    return bool(options.auth) or (bool(pairs) and all(_pair_ok(p) for p in pairs))


def _pair_ok(pair: str) -> bool:
    user, sep, password = pair.partition(":")
    return bool(user and sep and password)


def enforce(options: Any) -> None:
    """Default the address to loopback; refuse to serve beyond it without authentication.

    Raises ``FlowerAuthRequired`` when Flower would listen on a non-loopback address
    without credentials, or when the credentials are malformed.
    """
    pairs = [p for p in (options.basic_auth or []) if p]
    options.basic_auth = pairs  # FLOWER_BASIC_AUTH="" means none, not an empty password
    if not all(_pair_ok(p) for p in pairs):
        raise FlowerAuthRequired(
            "Flower: FLOWER_BASIC_AUTH must be user:password (several separated by commas); refusing to start."
        )
    if options.unix_socket:
        if not has_auth(options):
            logger.warning(
                "Flower has no authentication; anyone on this machine can use %s.",
                options.unix_socket,
            )
        return
    if not options.address:
        # Flower's own default is every interface; the safe default is this machine only.
        options.address = DEFAULT_ADDRESS
    if has_auth(options):
        return
    if is_loopback(options.address):
        logger.warning(
            "Flower has no authentication: listening on %s only, for local use. "
            "Set FLOWER_BASIC_AUTH=user:password before exposing it.",
            options.address,
        )
        return
    raise FlowerAuthRequired(
        f"Flower: refusing to listen on {options.address} without authentication. "
        "Set FLOWER_BASIC_AUTH=user:password (or bind to 127.0.0.1 for local use)."
    )


def install_guard() -> None:
    """Run ``enforce`` on Flower's final options before it opens its socket, and put
    Flower's ``/metrics`` behind the same authentication as its other pages."""
    try:
        from flower.app import Flower
    except ImportError:  # Flower is not installed: nothing to guard
        return
    protect_metrics()
    original = getattr(Flower, "start_http_server", None)
    if original is None:
        # A Flower without this hook would start unguarded: fail closed instead.
        raise SystemExit("Flower: cannot install the authentication guard for this Flower version.")
    if getattr(original, "_auth_guard", False):
        return

    def start_http_server(self: Any) -> Any:
        try:
            enforce(self.options)
        except FlowerAuthRequired as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None
        return original(self)

    start_http_server._auth_guard = True  # type: ignore[attr-defined]
    Flower.start_http_server = start_http_server  # type: ignore[method-assign]


def protect_metrics() -> None:
    """Flower 2.x serves ``/metrics`` (its Prometheus page: worker names, task names and
    counts) without asking for the credentials every other page needs. Wrap its handler
    in Tornado's ``authenticated``, as Flower wraps the others: basic auth answers 401
    without the password, OAuth redirects to the login page. ``/healthcheck`` (a bare
    "OK") stays open for probes."""
    from tornado import web

    try:
        from flower.views.monitor import Metrics
    except ImportError:
        raise SystemExit("Flower: cannot find its /metrics handler to protect in this Flower version.") from None
    if getattr(Metrics.get, "_auth_guard", False):
        return
    guarded = web.authenticated(Metrics.get)
    guarded._auth_guard = True  # type: ignore[attr-defined]
    Metrics.get = guarded  # type: ignore[method-assign]
