"""Who may read the operations pages that say more than "alive": a loopback caller that
no proxy forwarded, a caller presenting ``NOTIFICATIONS_OPS_TOKEN``, or a logged-in staff
user.

One rule for every such page (/readyz's details, the web process's /metrics, the worker's
and beat's metrics servers), so that opening one to a scraper or a load balancer opens
them all the same way, with one token.
"""

from __future__ import annotations

import hmac
import ipaddress
from base64 import b64decode
from collections.abc import Mapping
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest

from .conf import settings

# A request that came through a proxy on this host arrives from loopback; these headers
# show it, and such a request is not a local one.
FORWARDED_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def allowed(request: HttpRequest) -> bool:
    """True if ``request`` may see operational details.

    Never raises: a session that cannot be read (the database is down, which is what
    /readyz may be reporting) counts as no user.
    """
    return trusted(request.META) or is_staff(request)


def is_staff(request: HttpRequest) -> bool:
    try:
        user = getattr(request, "user", None)
        return bool(user is not None and user.is_authenticated and user.is_staff)
    except DatabaseError:
        return False


def trusted(environ: Mapping[str, Any]) -> bool:
    """A WSGI environ (or Django ``request.META``) whose caller needs no login: loopback
    and not forwarded (unless ``NOTIFICATIONS_OPS_LOOPBACK = False``), or presenting the
    token."""
    local = (
        settings.OPS_LOOPBACK
        and is_loopback(str(environ.get("REMOTE_ADDR") or ""))
        and not any(environ.get(h) for h in FORWARDED_HEADERS)
    )
    return bool(local) or has_token(str(environ.get("HTTP_AUTHORIZATION") or ""))


def has_token(authorization: str) -> bool:
    """True if an ``Authorization`` header value carries ``NOTIFICATIONS_OPS_TOKEN``, as a
    bearer token or as a basic-auth password (any user name, for scrapers that only speak
    basic auth), compared in constant time. False when no token is configured."""
    token = settings.OPS_TOKEN
    if not token:
        return False
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() == "basic":
        try:
            given = b64decode(given, validate=True).decode("utf-8").partition(":")[2]
        except ValueError:
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode("utf-8"), str(token).encode("utf-8"))


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (also as an IPv4-mapped IPv6 address)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
