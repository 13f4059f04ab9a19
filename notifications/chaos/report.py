"""The chaos run's verdict: what the mail server received against what the callers
committed and what the project recorded, checked against the contract."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import kinds
from .kinds import percentiles


@dataclass
class Verdict:
    report: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# Kinds of call whose notification committed (an "oversized" one committed only if
# notify() took it: then it must end failed as too large for a broker message).
COMMITTED_KINDS = (
    "new",
    "bounce",
    "poison",
    "undecodable",
    "large",
    "oversized",
    "scheduled",
    "expiring",
    "cancelled",
    "templated",
    "high",
    "burst",
)
# An expiring call whose retry (after a database error) found its expiry passed: it
# committed if its notification exists.
UNCERTAIN_KINDS = ("expiring_uncertain",)
# Where a notification may end: sent, or one of these with a reason the verdict checks.
SETTLED_STATUSES = ("sent", "failed", "ambiguous", "expired", "cancelled")


def committed_calls(calls: list[dict[str, Any]], existing: Any) -> dict[str, float]:
    """Key -> commit time of every call whose notification committed (``existing``: the
    keys the database has, which decide the uncertain ones)."""
    out = {c["key"]: c["at"] for c in calls if c["kind"] in COMMITTED_KINDS}
    for c in calls:
        if c["kind"] in UNCERTAIN_KINDS and c["key"] in existing:
            out.setdefault(c["key"], c["at"])
    return out


def judge(
    *,
    calls: list[dict[str, Any]],
    received: list[Any],
    notifications: dict[str, dict[str, Any]],
    claims: dict[str, dict[str, Any]],
    mode: str,
    poison_expected: bool,
    victims: list[dict[str, Any]] | None = None,
    takeover_limit: float = 30.0,
    backends: dict[str, dict[str, Any]] | None = None,
    rate_buckets: set[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Verdict:
    """The verdict on a run: ``calls`` the caller's lines, ``received`` what the mail
    server accepted, ``notifications`` and ``claims`` the database's rows after the
    drain (see ``ChaosRun.judge``); the kinds of traffic beside the plain one are judged
    by ``kinds.judge``."""
    committed = committed_calls(calls, notifications)
    refused = [c["key"] for c in calls if c["kind"] == "refused"]
    refused_written = sorted(k for k in refused if k in notifications)
    invalid = [c["key"] for c in calls if c["kind"] == "invalid"]
    rolled_back = {c["key"] for c in calls if c["kind"] == "rollback"}
    errors = [c["key"] for c in calls if c["kind"] == "error"]
    copies: Counter[str] = Counter(r.key for r in received)
    ids: dict[str, set[str]] = {}
    first_at: dict[str, float] = {}
    last_at: dict[str, float] = {}
    for r in received:
        ids.setdefault(r.key, set()).add(r.message_id)
        first_at.setdefault(r.key, r.wall)
        last_at[r.key] = r.wall

    failed = {k: n for k, n in notifications.items() if n["status"] == "failed"}
    held = {k for k, n in notifications.items() if n["status"] == "ambiguous"}
    # Ended without an email, each for a reason kinds.judge checks against its call.
    stopped = {k for k, n in notifications.items() if n["status"] in ("expired", "cancelled")}
    ambiguous = {k: n["ambiguous_count"] for k, n in notifications.items() if n["ambiguous_count"] > 0}
    lost = sorted(k for k in committed if k not in copies and k not in failed and k not in held and k not in stopped)
    unsettled = sorted(k for k in committed if notifications.get(k, {}).get("status") not in SETTLED_STATUSES)
    phantom = sorted(k for k in rolled_back if k in copies)
    duplicates = {k: c for k, c in copies.items() if c > 1}
    extra = sum(c - 1 for c in duplicates.values())
    unexplained = sorted(k for k, c in duplicates.items() if c - 1 > ambiguous.get(k, 0))
    mixed_ids = sorted(k for k in duplicates if len(ids[k]) > 1)
    stuck = sorted(k for k, c in claims.items() if c["state"] == "claimed")

    def reason(key: str, error: str) -> str:
        if "dead-lettered" in error:
            # Only a poison notification may end here: a good one dead-lettered is a loss.
            return "dead-lettered (poison)" if ":poison-" in key else "other"
        if "more than a broker message may carry" in error or "the broker refused" in error:
            return "too large for a message" if ":oversized-" in key else "other"
        if error.startswith("5") or " 5" in error[:12]:
            return "permanent reply (5xx)" if ":bounce-" in key else "other"
        if "gave up after" in error:
            return "retries exhausted"
        return "other"

    failed_by = Counter(reason(k, n["last_error"]) for k, n in failed.items())
    unjustified_failures = sorted(k for k, n in failed.items() if reason(k, n["last_error"]) == "other")
    poison_keys = {k for k in committed if ":poison-" in k}
    poison_not_failed = sorted(k for k in poison_keys if k not in failed)

    # Commit to the mail server, of the notifications due at once (a scheduled one waits
    # for its send_at on purpose: kinds.judge times it from then).
    scheduled = {c["key"] for c in calls if c.get("send_at") is not None}
    latency = [first_at[k] - committed[k] for k in committed if k in first_at and k not in scheduled]
    # Takeover: from a worker's death (or pause, or cut-off) to the moment each claim it
    # held was settled by another (sent, held or failed), as the database recorded it.
    takeovers: list[float] = []
    by_fault: dict[str, list[float]] = {}
    for victim in victims or []:
        note = notifications.get(victim["key"])
        if note is None:
            continue
        settled = note["sent_at"] if note["status"] == "sent" and note["sent_at"] else note["updated_at"]
        took = max(0.0, settled - victim["at"])
        takeovers.append(took)
        by_fault.setdefault(victim["fault"], []).append(took)
    window = [
        n["sent_at"] - last_at[k]
        for k, n in notifications.items()
        if n.get("sent_at") is not None and k in last_at and n["status"] == "sent"
    ]
    report = {
        "mode": mode,
        "notifications_expected": len(committed),
        "calls": dict(Counter(c["kind"] for c in calls)),
        "delivered_distinct": sum(1 for k in committed if k in copies),
        "lost": len(lost),
        "lost_keys": lost[:20],
        "unsettled": len(unsettled),
        "duplicates": len(duplicates),
        "duplicate_extra_copies": extra,
        "duplicates_unexplained": len(unexplained),
        "duplicates_with_different_message_id": len(mixed_ids),
        "rolled_back_sent": len(phantom),
        "ambiguous_recorded": len(ambiguous),
        "ambiguous_count_total": sum(ambiguous.values()),
        "ambiguous_with_real_duplicate": sum(1 for k in ambiguous if k in duplicates),
        "held": len(held),
        "failed": len(failed),
        "failed_by_reason": dict(failed_by),
        "stuck_claims": len(stuck),
        "caller_errors": len(errors),
        "latency_commit_to_smtp_s": percentiles(latency),
        "takeovers": len(takeovers),
        "takeover_s": percentiles(takeovers),
        "takeover_by_fault_s": {k: percentiles(v) | {"claims": len(v)} for k, v in sorted(by_fault.items())},
        "refused_at_notify": len(refused),
        "refused_yet_written": len(refused_written),
        "ambiguous_window_s": percentiles(window),
    }
    traffic, traffic_failures = kinds.judge(
        calls=calls,
        received=received,
        notifications=notifications,
        committed=committed,
        backends=backends,
        rate_buckets=rate_buckets,
        meta=meta,
    )
    report["traffic"] = traffic
    failures = []
    if lost:
        failures.append(f"{len(lost)} committed notification(s) lost, e.g. {lost[:3]}")
    if phantom:
        failures.append(f"{len(phantom)} rolled-back notification(s) sent, e.g. {phantom[:3]}")
    if unexplained:
        failures.append(f"{len(unexplained)} duplicate(s) not recorded as ambiguous, e.g. {unexplained[:3]}")
    if extra > sum(ambiguous.values()):
        failures.append(f"{extra} extra copies but only {sum(ambiguous.values())} ambiguous cases recorded")
    if mixed_ids:
        failures.append(f"{len(mixed_ids)} duplicate(s) with differing Message-IDs, e.g. {mixed_ids[:3]}")
    if mode == "hold" and duplicates:
        failures.append(f"hold mode sent {len(duplicates)} duplicate(s)")
    if unsettled:
        failures.append(f"{len(unsettled)} notification(s) not settled after the drain, e.g. {unsettled[:3]}")
    if stuck:
        failures.append(f"{len(stuck)} claim(s) still held after the drain, e.g. {stuck[:3]}")
    if unjustified_failures:
        failures.append(f"{len(unjustified_failures)} failure(s) without a permanent reply or exhausted retries")
    if poison_expected and poison_not_failed:
        failures.append(f"{len(poison_not_failed)} poison notification(s) not ended as failed")
    if errors:
        failures.append(f"the caller gave up on {len(errors)} call(s)")
    if invalid:
        failures.append(f"{len(invalid)} call(s) refused as invalid that were valid, e.g. {invalid[:3]}")
    if refused_written:
        failures.append(f"{len(refused_written)} refused call(s) wrote a notification, e.g. {refused_written[:3]}")
    slow = sorted(takeovers)
    if slow and slow[min(len(slow) - 1, int(0.99 * len(slow)))] > takeover_limit:
        failures.append(
            f"takeover p99 {slow[min(len(slow) - 1, int(0.99 * len(slow)))]:.1f}s is over {takeover_limit:.0f}s "
            f"(longest {slow[-1]:.1f}s)"
        )
    failures += traffic_failures
    return Verdict(report=report, failures=failures)


def render(report: dict[str, Any]) -> str:
    setup = report.get("setup", {})
    rows = [
        ("settings changed from project/settings.py", json.dumps(setup.get("settings_changed", "?"))),
        ("mode (NOTIFICATIONS_AMBIGUOUS)", report["mode"]),
        ("notifications expected (committed)", report["notifications_expected"]),
        ("delivered (distinct keys at the SMTP server)", report["delivered_distinct"]),
        ("lost", report["lost"]),
        ("duplicates (keys / extra copies)", f"{report['duplicates']} / {report['duplicate_extra_copies']}"),
        ("duplicates not recorded as ambiguous", report["duplicates_unexplained"]),
        ("duplicates whose Message-ID differs", report["duplicates_with_different_message_id"]),
        ("rolled back, yet sent", report["rolled_back_sent"]),
        (
            "ambiguous recorded (keys / with a real duplicate)",
            f"{report['ambiguous_recorded']} / {report['ambiguous_with_real_duplicate']}",
        ),
        ("held for a person (hold mode)", report["held"]),
        ("failed, by reason", json.dumps(report["failed_by_reason"]) if report["failed_by_reason"] else "0"),
        ("claims stuck after the drain", report["stuck_claims"]),
        ("latency commit -> SMTP (due at once), p50 / p99 / max (s)", _p(report["latency_commit_to_smtp_s"])),
        (
            f"takeover of {report.get('takeovers', 0)} claim(s) of dead, paused or cut-off workers, "
            "p50 / p99 / max (s)",
            _p(report.get("takeover_s") or percentiles([])),
        ),
        ("oversized calls refused at notify() (nothing written)", report.get("refused_at_notify", 0)),
        ("ambiguous window end of DATA -> result committed, p50 / p99 / max (s)", _p(report["ambiguous_window_s"])),
        ("time to drain after the faults stopped (s)", report.get("drain_seconds")),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(report.get("faults", {}).items()))),
    ]
    gaps = report.get("delivery_gap_after_fault_s") or {}
    if gaps:
        rows.append(
            ("longest gap in deliveries within 30 s of a fault (s)", ", ".join(f"{k} {v}" for k, v in gaps.items()))
        )
    for pause in (report.get("cluster") or {}).get("pauses", []):
        rows.append(
            (
                f"RabbitMQ leader {pause['kind']} ({pause['node']}): delivery paused (s)",
                f"{pause['delivery_pause']} (normal gap {pause['baseline_delivery_gap']}; "
                f"down {pause['down_seconds']}s, new leader {pause['new_leader']})",
            )
        )
    rows += _traffic_rows(report.get("traffic") or {})
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _p(values: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.3f}" for v in values.values())


def _traffic_rows(traffic: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's lines on the kinds of traffic (``kinds.judge``)."""
    if not traffic:
        return []
    rows: list[tuple[str, Any]] = []
    mix = traffic.get("mix") or {}
    rows.append(("traffic mix (shares of all calls; the rest plain)", ", ".join(f"{k} {v}" for k, v in mix.items())))
    for label, row in (traffic.get("by_kind") or {}).items():
        statuses = ", ".join(f"{k} {v}" for k, v in row["statuses"].items())
        rows.append(
            (
                f"  {label}: committed / delivered / extra copies; ended",
                f"{row['committed']} / {row['delivered']} / {row['extra_copies']}; {statuses}",
            )
        )
    templated = traffic.get("templated") or {}
    if templated:
        state = "sent" if templated.get("enabled") else "SKIPPED"
        rows.append(("templated traffic", f"{state}: {templated.get('note', '')}"))
    outcomes = traffic.get("cancel_outcomes") or {}
    rows.append(("cancel() said", ", ".join(f"{k} {v}" for k, v in outcomes.items()) or "-"))
    rows.append(("latency high priority, p50 / p99 / max (s)", _p(traffic["latency_high_s"])))
    rows.append(("latency normal priority, p50 / p99 / max (s)", _p(traffic["latency_normal_s"])))
    rows.append(
        ("scheduled: first arrival after send_at, p50 / p99 / max (s)", _p(traffic["lateness_after_send_at_s"]))
    )
    rows.append(("expiring: last arrival before expires_at, p50 / p99 / max (s)", _p(traffic["expiring_margin_s"])))
    rows.append(
        (
            "closest to the edges: arrival before expires_at / after send_at (s)",
            f"{traffic.get('closest_to_expiry_s')} / {traffic.get('closest_to_send_at_s')}",
        )
    )
    routing = traffic.get("routing") or {}
    if routing:
        rows.append(("backend routing", routing.get("verdict", "-")))
    for name, row in (traffic.get("rate") or {}).items():
        rows.append(
            (
                f"rate of backend {name!r} ({row['rate_limit_per_s']}/s): peak emails in 1 s",
                f"{row['peak_in_1s']} of {row['allowed_in_1s']} allowed, {row['emails']} emails: {row['verdict']}",
            )
        )
    violations = traffic.get("violations") or {}
    rows.append(("violations (early, after expiry, after cancel, ...)", json.dumps(violations) if violations else "0"))
    return rows
