"""The chaos run's judge catches every way the traffic can break the contract: fed the
records of a run (the caller's lines, what the mail server received, the rows after the
drain), it passes a clean one and fails each violation, naming the key."""

from __future__ import annotations

import email.message
from typing import Any

import pytest

from notifications.chaos import report
from notifications.chaos.mailserver import Received

T0 = 1_700_000_000.0  # the run's wall clock: every moment below is relative to it
BACKENDS = {
    "transactional": {"BACKEND": "smtp", "OPTIONS": {"port": 1}},
    "bulk": {"BACKEND": "smtp", "OPTIONS": {"port": 2}, "RATE_LIMIT": 10.0, "CONNECTIONS": 2},
}


class Run:
    """Records of a synthetic run, built call by call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.received: list[Received] = []
        self.notifications: dict[str, dict[str, Any]] = {}
        self.buckets: set[str] = {"bulk"}

    def call(self, kind: str, key: str, at: float = 0.0, status: str = "sent", **shape: Any) -> str:
        line = {"key": key, "kind": kind, "at": T0 + at, "backend": "transactional", "priority": "normal"}
        for name in ("send_at", "expires_at"):
            if name in shape:
                shape[name] = T0 + shape[name]
        line.update(shape)
        self.calls.append(line)
        self.notifications[key] = {
            "status": status,
            "ambiguous_count": 0,
            "last_error": "",
            "sent_at": None,
            "updated_at": T0 + at,
        }
        return key

    def cancelled(self, key: str, at: float, in_time: bool, cancelled: bool | None = None, status: str = "") -> None:
        stopped = in_time if cancelled is None else cancelled
        self.calls.append(
            {
                "key": key,
                "kind": "cancel",
                "asked_at": T0 + at,
                "at": T0 + at + 0.01,
                "cancelled": stopped,
                "in_time": in_time,
                "status": status or ("cancelled" if stopped else "sent"),
            }
        )

    def arrive(self, key: str, at: float, listener: str = "transactional", subject: str = "Chaos") -> None:
        msg = email.message.EmailMessage()
        msg["Subject"] = subject
        self.received.append(Received(key, f"<{key}@x>", ["a@example.com"], msg, at, T0 + at, listener=listener))

    def judge(self, mode: str = "resend") -> report.Verdict:
        return report.judge(
            calls=self.calls,
            received=self.received,
            notifications=self.notifications,
            claims={},
            mode=mode,
            poison_expected=False,
            backends=BACKENDS,
            rate_buckets=self.buckets,
            meta={"mix": {"scheduled": 0.1}},
        )


def clean_run() -> Run:
    """One of each kind, each ending as it should."""
    run = Run()
    run.arrive(run.call("new", "chaos:n0:u0", at=0.0), at=0.05)
    run.arrive(run.call("scheduled", "chaos:scheduled-1:u1", at=1.0, send_at=5.0), at=5.01)
    run.arrive(run.call("expiring", "chaos:expiring-2:u2", at=2.0, expires_at=10.0), at=2.05)
    run.call("expiring", "chaos:expiring-3:u3", at=3.0, status="expired", send_at=4.0, expires_at=4.5)
    run.cancelled(run.call("cancelled", "chaos:cancelled-4:u4", at=4.0, status="cancelled", send_at=9.0), 5.0, True)
    run.arrive(run.call("cancelled", "chaos:cancelled-5:u5", at=5.0), at=5.04)
    run.cancelled("chaos:cancelled-5:u5", 5.5, in_time=False)
    run.arrive(
        run.call("templated", "chaos:templated-6:u6", at=6.0, expected_subject="Chaos notice abc"),
        at=6.05,
        subject="Chaos notice abc",
    )
    run.arrive(run.call("high", "chaos:high-7:u7", at=7.0, priority="high"), at=7.02)
    for j in range(10):  # ten in one second: the bulk backend's limit
        run.arrive(
            run.call("burst", f"chaos:burst-{j}:u{j}", at=8.0, backend="bulk"), at=8.0 + j * 0.1, listener="bulk"
        )
    return run


def test_a_clean_run_passes_and_is_judged_by_kind() -> None:
    verdict = clean_run().judge()

    assert verdict.failures == []
    traffic = verdict.report["traffic"]
    assert traffic["violations"] == {}
    assert traffic["by_kind"]["expiring"] == {
        "committed": 2,
        "delivered": 1,
        "extra_copies": 0,
        "statuses": {"expired": 1, "sent": 1},
        "backends": {"transactional": 2},
    }
    assert traffic["cancel_outcomes"] == {"in time": 1, "too late (sent)": 1}
    assert traffic["latency_high_s"]["p50"] == pytest.approx(0.02, abs=1e-3)
    assert traffic["routing"]["verdict"].startswith("all 16 emails through the backend")
    assert traffic["rate"]["bulk"]["peak_in_1s"] == 10
    assert verdict.report["lost"] == 0


def test_an_email_before_its_send_at_fails_the_run() -> None:
    run = clean_run()
    run.arrive(run.call("scheduled", "chaos:scheduled-20:u1", at=1.0, send_at=6.0), at=5.999)

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"early": 1}
    assert any("before their send_at" in f and "chaos:scheduled-20:u1" in f for f in verdict.failures)


def test_an_email_after_its_expiry_fails_the_run() -> None:
    run = clean_run()
    run.arrive(run.call("expiring", "chaos:expiring-21:u2", at=2.0, expires_at=9.0), at=9.01)

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"after_expiry": 1}
    assert any("after their expires_at" in f and "chaos:expiring-21:u2" in f for f in verdict.failures)


def test_an_expiring_notification_neither_sent_nor_expired_fails_the_run() -> None:
    run = clean_run()
    run.call("expiring", "chaos:expiring-22:u2", at=2.0, status="retrying", expires_at=9.0)

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"]["expiring_unsettled"] == 1
    assert verdict.report["unsettled"] == 1


def test_an_email_after_an_in_time_cancel_fails_the_run() -> None:
    run = clean_run()
    key = run.call("cancelled", "chaos:cancelled-23:u4", at=4.0, status="cancelled")
    run.cancelled(key, 4.5, in_time=True)
    run.arrive(key, at=4.6)

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"after_cancel": 1}
    assert any("after an in-time cancel" in f and key in f for f in verdict.failures)


def test_an_in_time_cancel_that_did_not_end_cancelled_fails_the_run() -> None:
    run = clean_run()
    run.cancelled(run.call("cancelled", "chaos:cancelled-24:u4", at=4.0, status="scheduled"), 4.5, in_time=True)

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"after_cancel": 1}


def test_a_lost_notification_fails_the_run() -> None:
    run = clean_run()
    run.call("scheduled", "chaos:scheduled-25:u1", at=1.0, status="sent", send_at=3.0)

    verdict = run.judge()

    assert verdict.report["lost_keys"] == ["chaos:scheduled-25:u1"]
    assert any("lost" in f for f in verdict.failures)


def test_a_notification_expired_or_cancelled_for_no_reason_fails_the_run() -> None:
    run = clean_run()
    run.call("new", "chaos:n26:u0", status="expired")
    run.call("high", "chaos:high-27:u7", status="cancelled", priority="high")

    verdict = run.judge()

    assert verdict.report["lost"] == 0  # ended without an email, for a reason the kind check refuses:
    assert verdict.report["traffic"]["violations"] == {"cancelled_unasked": 1, "expired_without_expiry": 1}
    assert len(verdict.failures) == 2


def test_a_doubled_email_not_counted_ambiguous_fails_the_run() -> None:
    run = clean_run()
    run.arrive("chaos:high-7:u7", at=7.5)

    verdict = run.judge()

    assert verdict.report["duplicates_unexplained"] == 1
    assert any("not recorded as ambiguous" in f for f in verdict.failures)


def test_a_templated_email_with_another_subject_fails_the_run() -> None:
    run = clean_run()
    key = run.call("templated", "chaos:templated-28:u6", at=6.0, expected_subject="Chaos notice def")
    run.arrive(key, at=6.1, subject="Chaos 28")

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"template_subject": 1}


def test_an_email_through_the_wrong_backend_fails_the_run() -> None:
    run = clean_run()
    run.arrive(run.call("new", "chaos:n29:u0", backend="bulk"), at=0.1, listener="transactional")

    verdict = run.judge()

    assert verdict.report["traffic"]["violations"] == {"misrouted": 1}


def test_backends_unused_for_sending_are_reported_as_such() -> None:
    run = clean_run()
    for r in run.received:
        r.listener = "default"  # every email through Django's EMAIL_HOST/EMAIL_PORT

    verdict = run.judge()

    assert verdict.failures == []
    assert verdict.report["traffic"]["routing"]["verdict"].startswith("not in this build")
    assert verdict.report["traffic"]["rate"]["bulk"]["verdict"].startswith("not checked")


def test_a_backend_over_its_rate_fails_the_run_once_the_rate_is_enforced() -> None:
    run = clean_run()
    run.arrive(run.call("burst", "chaos:burst-30:u0", at=8.0, backend="bulk"), at=8.95, listener="bulk")
    run.arrive(run.call("burst", "chaos:burst-31:u1", at=8.0, backend="bulk"), at=8.96, listener="bulk")

    verdict = run.judge()

    assert verdict.report["traffic"]["rate"]["bulk"]["peak_in_1s"] == 12  # limit 10/s, 11 allowed
    assert verdict.report["traffic"]["violations"] == {"rate": 1}

    run.buckets = set()  # no bucket ever written: the pipeline did not enforce the limit
    verdict = run.judge()

    assert verdict.failures == []
    assert verdict.report["traffic"]["rate"]["bulk"]["verdict"].startswith("not enforced in this build")
