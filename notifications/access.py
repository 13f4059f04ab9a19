"""Who may read the operations pages that say more than "alive": a loopback caller, a
caller with the bearer token ``NOTIFICATIONS_OPS_TOKEN``, or a logged-in staff user.

One rule for every such page (/readyz's details, the metrics), so that opening one to a
scraper or a load balancer opens them all the same way.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.db import DatabaseError
from django.http import HttpRequest

from .conf import settings


def allowed(request: HttpRequest) -> bool:
    """True if ``request`` may see operational details.

    Never raises: a session that cannot be read (the database is down, which is what
    /readyz may be reporting) counts as no user.
    """
    if settings.OPS_LOOPBACK and is_loopback(request.META.get("REMOTE_ADDR") or ""):
        return True
    if has_token(request):
        return True
    try:
        user = getattr(request, "user", None)
        return bool(user is not None and user.is_authenticated and user.is_staff)
    except DatabaseError:
        return False


def has_token(request: HttpRequest) -> bool:
    """True if the request carries ``Authorization: Bearer <NOTIFICATIONS_OPS_TOKEN>``
    (compared in constant time); False when no token is configured."""
    token = settings.OPS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), str(token).encode())


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (also as an IPv4-mapped IPv6 address)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
