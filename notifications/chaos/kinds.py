"""The chaos run's verdict on each kind of traffic beside the plain one: nothing sent
before its ``send_at``, after its ``expires_at`` or after an in-time ``cancel()``; each
expiring one sent in time or ended ``expired``; templated ones with the subject their
template renders; high-priority ones delivered, and how fast beside the normal ones;
every email through the backend its notification names, within that backend's rate.

The mail server stamps each message the moment it holds all of it, on the machine's
clock, which the workers read too: the moments compare with no tolerance beyond the
microsecond the database keeps.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

# The database keeps moments to the microsecond; the caller recorded them as floats.
RESOLUTION = 1e-6
# A backend's rate is checked over every window of this many seconds, with this slack.
RATE_WINDOW = 1.0
RATE_SLACK = 1.1
# What a notification may end as, by kind (any kind may also end failed for a reason
# the main verdict accepts, or be held in hold mode).
KIND_LABELS = {"new": "plain", "burst": "burst (bulk, one notify_many)", "bounce": "bounce (5xx)"}
# Listener of the mail server that Django's own EMAIL_HOST / EMAIL_PORT point at: what
# an email reaches when it goes through no named backend.
DJANGO_DEFAULT = "default"


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 4)}


def peak(times: list[float], window: float = RATE_WINDOW) -> tuple[int, float | None]:
    """The most ``times`` in any half-open window ``[t, t + window)``, and where it starts."""
    ordered = sorted(times)
    best, where, lo = 0, None, 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - window:
            lo += 1
        if hi - lo + 1 > best:
            best, where = hi - lo + 1, ordered[lo]
    return best, where


def judge(
    *,
    calls: list[dict[str, Any]],
    received: list[Any],
    notifications: dict[str, dict[str, Any]],
    committed: dict[str, float],
    backends: dict[str, dict[str, Any]] | None = None,
    rate_buckets: set[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The per-kind section of the report, and the violations (each a failure line).

    ``calls``: the caller's lines (``kind``, ``key``, ``at``, and ``send_at``,
    ``expires_at``, ``backend``, ``priority``, ``expected_subject`` when given, and one
    ``cancel`` line per cancelled key with what ``cancel()`` returned); ``committed``:
    key -> commit time of every notification that committed; ``backends``: the named
    backends of the run (name -> entry of ``NOTIFICATIONS_BACKENDS``), whose listeners
    at the mail server carry the same names; ``rate_buckets``: the backends with a
    ``RateBucket`` row (the pipeline enforced a rate for them).
    """
    shape: dict[str, dict[str, Any]] = {}
    for call in calls:
        if call["key"] in committed and call["kind"] not in ("repeat", "cancel", "cancel_error"):
            shape.setdefault(call["key"], call)
    cancels = {c["key"]: c for c in calls if c["kind"] in ("cancel", "cancel_error")}
    arrivals: dict[str, list[Any]] = defaultdict(list)
    for r in received:
        arrivals[r.key].append(r)
    for found in arrivals.values():
        found.sort(key=lambda r: r.wall)

    violations: dict[str, list[str]] = defaultdict(list)

    def status(key: str) -> str:
        return str(notifications.get(key, {}).get("status", "missing"))

    def when(t: float) -> str:
        return f"{t:.6f}"

    # -- moments ------------------------------------------------------------------------
    for key, call in shape.items():
        send_at, expires_at = call.get("send_at"), call.get("expires_at")
        for r in arrivals.get(key, []):
            if send_at is not None and r.wall < send_at - RESOLUTION:
                violations["early"].append(
                    f"{key}: reached the mail server at {when(r.wall)}, {send_at - r.wall:.3f}s before its send_at "
                    f"{when(send_at)}"
                )
            if expires_at is not None and r.wall > expires_at + RESOLUTION:
                violations["after_expiry"].append(
                    f"{key}: reached the mail server at {when(r.wall)}, {r.wall - expires_at:.3f}s after its "
                    f"expires_at {when(expires_at)} (status {status(key)})"
                )
        if expires_at is not None and status(key) not in ("sent", "expired", "ambiguous", "failed"):
            violations["expiring_unsettled"].append(f"{key}: expiring, ended {status(key)}")
        if expires_at is None and status(key) == "expired":
            violations["expired_without_expiry"].append(f"{key}: ended expired but had no expires_at")

    # -- cancels ------------------------------------------------------------------------
    cancel_outcomes: Counter[str] = Counter()
    for key, call in shape.items():
        if call["kind"] != "cancelled":
            if status(key) == "cancelled":
                violations["cancelled_unasked"].append(f"{key}: ended cancelled, but nobody cancelled it")
            continue
        said = cancels.get(key)
        if said is None or said["kind"] == "cancel_error":
            violations["cancel_unanswered"].append(f"{key}: cancel() never returned")
            continue
        got = arrivals.get(key, [])
        if said["in_time"]:
            cancel_outcomes["in time"] += 1
            if got:
                late = ", ".join(when(r.wall) for r in got)
                violations["after_cancel"].append(
                    f"{key}: cancel() said in time at {when(said['at'])} (asked {when(said['asked_at'])}), "
                    f"yet the mail server received it at {late} (status {status(key)})"
                )
            if status(key) != "cancelled":
                violations["after_cancel"].append(f"{key}: cancel() said in time, yet it ended {status(key)}")
        elif said["cancelled"]:
            cancel_outcomes["stopped, not in time (an earlier send may have reached the server)"] += 1
            if status(key) != "cancelled":
                violations["cancel_inconsistent"].append(f"{key}: cancel() stopped it, yet it ended {status(key)}")
        else:
            cancel_outcomes[f"too late ({said['status']})"] += 1
            if said["status"] == "unknown" or status(key) == "cancelled":
                violations["cancel_inconsistent"].append(
                    f"{key}: cancel() said {said['status']!r}, not cancelled; it ended {status(key)}"
                )

    # -- templates ----------------------------------------------------------------------
    for key, call in shape.items():
        expected = call.get("expected_subject")
        if expected is None:
            continue
        for r in arrivals.get(key, []):
            subject = str(r.message.get("Subject", "")).strip() if r.message is not None else ""
            if subject != expected:
                violations["template_subject"].append(f"{key}: subject {subject!r}, rendered should be {expected!r}")

    # -- backends -----------------------------------------------------------------------
    routing: dict[str, Any] = {}
    rate: dict[str, Any] = {}
    if backends:
        by_listener: Counter[str] = Counter()
        wrong: list[str] = []
        through_default = 0
        for key, call in shape.items():
            for r in arrivals.get(key, []):
                by_listener[f"{call.get('backend')} -> {r.listener}"] += 1
                if r.listener == call.get("backend"):
                    continue
                if r.listener == DJANGO_DEFAULT:
                    through_default += 1
                wrong.append(f"{key}: names backend {call.get('backend')!r}, reached listener {r.listener!r}")
        routed = sum(by_listener.values())
        routing = {"arrivals_by_backend_and_listener": dict(sorted(by_listener.items()))}
        if routed and through_default == routed:
            # Every email of every backend came through Django's own EMAIL_* settings, none
            # through its backend's OPTIONS: the named backends are not used for sending.
            routing["verdict"] = (
                f"not in this build: all {routed} emails went through Django's EMAIL_HOST/EMAIL_PORT, none through "
                "the backend their notification names"
            )
        elif wrong:
            routing["verdict"] = f"{len(wrong)} of {routed} emails through the wrong backend"
            violations["misrouted"] += wrong
        else:
            routing["verdict"] = f"all {routed} emails through the backend their notification names"
        for name, entry in backends.items():
            limit = entry.get("RATE_LIMIT")
            if not limit:
                continue
            times = [r.wall for r in received if r.listener == name]
            most, start = peak(times)
            allowed = float(limit) * RATE_SLACK
            row: dict[str, Any] = {
                "rate_limit_per_s": float(limit),
                "emails": len(times),
                "peak_in_1s": most,
                "allowed_in_1s": math.floor(allowed + 1e-9),
                "peak_at": start,
            }
            enforced = name in (rate_buckets or set())
            if not times:
                row["verdict"] = "not checked: nothing reached its listener"
            elif most <= allowed:
                row["verdict"] = "within the limit" + ("" if enforced else " (no RateBucket row: not enforced?)")
            elif not enforced:
                row["verdict"] = (
                    f"not enforced in this build: {most} emails in 1 s (limit {limit}/s) and no RateBucket row "
                    f"for {name!r} was ever written"
                )
            else:
                row["verdict"] = f"over the limit: {most} emails in 1 s (limit {limit}/s)"
                violations["rate"].append(f"backend {name!r}: {most} emails in the 1 s from {start} (limit {limit}/s)")
            rate[name] = row

    # -- per kind -----------------------------------------------------------------------
    rows: dict[str, dict[str, Any]] = {}
    for key, call in shape.items():
        label = KIND_LABELS.get(call["kind"], call["kind"])
        row = rows.setdefault(
            label, {"committed": 0, "delivered": 0, "extra_copies": 0, "statuses": Counter(), "backends": Counter()}
        )
        row["committed"] += 1
        got = arrivals.get(key, [])
        row["delivered"] += 1 if got else 0
        row["extra_copies"] += max(0, len(got) - 1)
        row["statuses"][status(key)] += 1
        row["backends"][str(call.get("backend"))] += 1
    for row in rows.values():
        row["statuses"] = dict(sorted(row["statuses"].items()))
        row["backends"] = dict(sorted(row["backends"].items()))

    def latency(select: Any, since: str = "at") -> list[float]:
        out = []
        for key, call in shape.items():
            if select(call) and arrivals.get(key) and call.get(since) is not None:
                out.append(arrivals[key][0].wall - (committed[key] if since == "at" else call[since]))
        return out

    margins = [
        call["expires_at"] - arrivals[key][-1].wall
        for key, call in shape.items()
        if "expires_at" in call and arrivals.get(key)
    ]
    early = [
        arrivals[key][0].wall - call["send_at"]
        for key, call in shape.items()
        if "send_at" in call and arrivals.get(key)
    ]
    unscheduled = {"new", "templated", "high"}  # the burst waits for its rate
    report = {
        "by_kind": dict(sorted(rows.items())),
        "mix": (meta or {}).get("mix"),
        "bulk_share": (meta or {}).get("bulk_share"),
        "templated": (meta or {}).get("templated"),
        "cancel_outcomes": dict(cancel_outcomes),
        "latency_high_s": percentiles(latency(lambda c: c.get("priority") == "high" and "send_at" not in c)),
        "latency_normal_s": percentiles(
            latency(lambda c: c["kind"] in unscheduled and c.get("priority") != "high" and "send_at" not in c)
        ),
        "lateness_after_send_at_s": percentiles(latency(lambda c: "send_at" in c, since="send_at")),
        "expiring_margin_s": percentiles(margins),
        # How near the edges the run came: the least time an email arrived before its
        # expiry, and after its send_at (negative would be a violation).
        "closest_to_expiry_s": round(min(margins), 6) if margins else None,
        "closest_to_send_at_s": round(min(early), 6) if early else None,
        "routing": routing,
        "rate": rate,
        "violations": {k: len(v) for k, v in sorted(violations.items())},
        "violation_examples": {k: v[:5] for k, v in sorted(violations.items())},
    }
    failures = [f"{len(v)} {_WHAT[k]}, e.g. {v[0]}" for k, v in sorted(violations.items()) if v]
    return report, failures


_WHAT = {
    "early": "email(s) reached the mail server before their send_at",
    "after_expiry": "email(s) reached the mail server after their expires_at",
    "expiring_unsettled": "expiring notification(s) neither sent nor expired",
    "expired_without_expiry": "notification(s) without an expires_at ended expired",
    "cancelled_unasked": "notification(s) ended cancelled that nobody cancelled",
    "cancel_unanswered": "cancel() call(s) that never returned",
    "after_cancel": "notification(s) sent (or not ended cancelled) after an in-time cancel()",
    "cancel_inconsistent": "cancel() answer(s) the outcome contradicts",
    "template_subject": "templated email(s) whose subject is not what the template renders",
    "misrouted": "email(s) through a backend other than the one their notification names",
    "rate": "rate limit(s) exceeded",
}
