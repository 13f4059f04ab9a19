"""Each email backend's rate limit (``RATE_LIMIT``, emails per second), held across every
worker and host: one row per backend in PostgreSQL (``RateBucket``) with the time its
next email may start, a generic cell rate algorithm kept as "the next allowed time".

Why PostgreSQL, and not Redis: it is the one store whose loss stops sending anyway (the
claims live there, and no email starts without one), so losing Redis changes nothing
here, and no lost key can ever release a burst. The cost is one autocommit statement
per email on the sending thread's own database connection, beside the one that
records each outcome.

A grant is a slot: the row's next allowed time moves on by one interval (``1 / rate``)
in the same statement, and the sender must not start before its slot. So slots are one
interval apart whichever worker took them, with no burst tolerance at all: after an
idle spell the first email goes at once and the next one interval later. A slot is
granted only within ``within`` seconds of now (the caller's remaining time budget, at
most ``HORIZON``), so a sender never holds a slot it will not live to use; a slot that
goes unused (its task stopped) is lost, which makes the limit slower, never faster.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connections

from .models import RateBucket

# The furthest ahead a slot is granted. Senders beyond it wait and ask again, so at a
# high rate a queue of waiting senders holds at most this much of the future.
HORIZON = 1.0

# Slots are spaced for this share of the limit. A slot is when a send may start; the
# provider counts arrivals, and arrivals jitter with each SMTP transaction's length and
# the sending process's scheduling, so a few late sends land beside punctual ones. Five
# per cent of headroom keeps a busy host's bunching inside the limit (slower, never faster).
HEADROOM = 0.95

# The shortest wait a refusal asks for, so that a sender that lost a race does not spin.
MIN_WAIT = 0.005

_TABLE = RateBucket._meta.db_table

# One statement: take the next slot if it comes within %(within)s seconds, and say how
# far off it is; or, refused, how long until one would be granted. The refusal reads the
# row as it was when the statement began, which can only make that wait shorter than it
# need be (the sender asks again), never let anyone start early. clock_timestamp(), not
# now(): a statement that waited for the row lock must not take a slot in the past.
_TAKE = f"""
WITH taken AS (
    UPDATE {_TABLE}
    SET next_at = GREATEST(next_at, clock_timestamp()) + make_interval(secs => %(interval)s)
    WHERE name = %(name)s AND next_at <= clock_timestamp() + make_interval(secs => %(within)s)
    RETURNING next_at
)
SELECT
    (SELECT EXTRACT(EPOCH FROM next_at - clock_timestamp()) - %(interval)s FROM taken),
    (SELECT EXTRACT(EPOCH FROM next_at - clock_timestamp()) - %(within)s FROM {_TABLE} WHERE name = %(name)s)
"""

_CREATE = f"INSERT INTO {_TABLE} (name, next_at) VALUES (%s, clock_timestamp()) ON CONFLICT (name) DO NOTHING"


@dataclass(frozen=True)
class Grant:
    """The answer for one email: a slot ``wait`` seconds from now (0: now), or, when not
    ``granted``, the seconds to wait before asking again."""

    granted: bool
    wait: float


def acquire(name: str, rate: float, within: float, using: str) -> Grant:
    """Take the backend ``name``'s next slot at ``rate`` emails per second, if it comes
    within ``within`` seconds (capped at ``HORIZON``), in autocommit on the database
    ``using``. The bucket's row is created on first use. Raises ``DatabaseError``: then
    nothing was taken, and nothing may be sent (which the lost database would stop
    anyway)."""
    params: dict[str, str | float] = {
        "name": name,
        "interval": 1.0 / (rate * HEADROOM),
        "within": max(0.0, min(within, HORIZON)),
    }
    with connections[using].cursor() as cursor:
        for _ in range(2):
            cursor.execute(_TAKE, params)
            row = cursor.fetchone()
            slot, refused = row if row is not None else (None, None)
            if slot is not None:
                return Grant(True, max(0.0, float(slot)))
            if refused is not None:
                return Grant(False, max(MIN_WAIT, float(refused)))
            cursor.execute(_CREATE, [name])  # first use of this backend: then take a slot
    raise AssertionError("the rate bucket row could not be created")
