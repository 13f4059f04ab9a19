"""An operator's cancel: the admin's "Cancel selected notifications" action and
``manage.py notifications cancel`` call ``cancel()`` for each key through this one
function and report its verdicts in the same words.

``cancel()`` decides on the claim row, so nothing here can stop a send that a worker is
handing over, nor call a notification stopped that will still be sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .conf import settings


class Verdict(StrEnum):
    IN_TIME = "cancelled in time"  # nothing was sent, nothing will be
    ALREADY = "already cancelled"
    LATE = "stopped, too late to be sure"  # nothing more is sent; an earlier send may have arrived
    TOO_LATE = "too late"  # sent, being sent, or finished otherwise: unchanged
    UNKNOWN = "unknown"  # no notification has this key


# The verdicts that leave nothing sent, for the command line's exit code.
STOPPED_IN_TIME = (Verdict.IN_TIME, Verdict.ALREADY)


@dataclass(frozen=True)
class Result:
    key: str
    verdict: Verdict
    status: str  # the notification's status now ("unknown": none has the key)

    def describe(self) -> str:
        """The verdict as the command line prints it after the key."""
        if self.verdict == Verdict.LATE:
            return f"{self.verdict}: an earlier send may have reached the mail server"
        if self.verdict == Verdict.TOO_LATE:
            return f"{self.verdict} ({self.status})"
        return str(self.verdict)


def cancel_keys(keys: Iterable[str], *, reason: str, using: str | None = None) -> list[Result]:
    """Cancel each of ``keys`` (each in a transaction of its own, so one too late does not
    undo the others) and say what became of it, in the order given (a key given twice is
    cancelled once). Raises ``InvalidNotification`` for a bad ``reason`` or a key that is
    not a non-empty string, before any cancel: never after some were cancelled."""
    from . import validation
    from .api import cancel
    from .exceptions import InvalidNotification
    from .models import Notification, Status

    db = using or settings.DATABASE
    validation.body("reason", reason)
    wanted = list(dict.fromkeys(keys))
    for key in wanted:
        if not isinstance(key, str) or not key:
            raise InvalidNotification(
                "key", f"must be a notification key, service:notification_id:user_id, got {key!r}"
            )
    before = dict(Notification.objects.using(db).filter(key__in=wanted).values_list("key", "status"))
    results = []
    for key in wanted:
        done = cancel(key, reason=reason, using=db)
        if done.status == "unknown":
            verdict = Verdict.UNKNOWN
        elif done.in_time:
            verdict = Verdict.ALREADY if before.get(key) == Status.CANCELLED else Verdict.IN_TIME
        elif done.cancelled:
            verdict = Verdict.LATE
        else:
            verdict = Verdict.TOO_LATE
        results.append(Result(key, verdict, done.status))
    return results


def summary(results: list[Result]) -> list[tuple[Verdict, str]]:
    """One sentence per verdict that occurred (the too-late ones with their statuses),
    for the admin's messages."""
    counts = Counter(r.verdict for r in results)
    late = Counter(r.status for r in results if r.verdict == Verdict.TOO_LATE)
    sentences = {
        Verdict.IN_TIME: "notification(s) cancelled in time: nothing was sent, and nothing will be.",
        Verdict.ALREADY: "notification(s) were cancelled already.",
        Verdict.LATE: "notification(s) stopped too late to be sure: nothing more will be sent, but an earlier "
        "send may have reached the mail server.",
        Verdict.TOO_LATE: "notification(s) too late to cancel, left as they are: "
        + ", ".join(f"{status} {count}" for status, count in sorted(late.items()))
        + ".",
        Verdict.UNKNOWN: "key(s) unknown: no notification has them (any more).",
    }
    return [(verdict, f"{counts[verdict]} {sentences[verdict]}") for verdict in Verdict if counts[verdict]]
