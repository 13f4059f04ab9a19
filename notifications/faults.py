"""Named crash points, so tests and the chaos run can kill a process inside the narrow
windows that random kills rarely hit.

Off unless ``NOTIFICATIONS_CRASH_POINTS`` is set in the environment (read once at
import): then each ``point=prefix`` pair SIGKILLs the process when it reaches ``point``
for a key starting with ``prefix`` (``*`` for any key). In normal runs a call is one
dictionary truthiness test.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "relay_after_claim",  # outbox rows locked, nothing published yet
    "relay_after_confirm",  # broker confirmed, rows not yet marked published
    "before_claim",  # message received, nothing written yet
    "before_send",  # claim taken and send_started_at committed; the server has nothing yet
    "after_reply",  # the mail server accepted, the result is not recorded
    "after_record",  # the result is recorded, the message is not acked
)


def _parse(spec: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, prefix = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"NOTIFICATIONS_CRASH_POINTS: unknown point {name!r}; known: {', '.join(POINTS)}")
        points[name] = prefix or "*"
    return points


_ACTIVE = _parse(os.environ.get("NOTIFICATIONS_CRASH_POINTS", ""))


def crash_point(name: str, key: str = "") -> None:
    """Die here, as a SIGKILL would, if this point is armed for ``key``."""
    if not _ACTIVE:
        return
    prefix = _ACTIVE.get(name)
    if prefix is not None and (prefix == "*" or key.startswith(prefix)):
        os.kill(os.getpid(), signal.SIGKILL)
