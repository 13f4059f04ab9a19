"""The pipeline's Prometheus metrics, defined once: the counters and histograms each
stage increments, named ``notifications_*``, every label from a fixed vocabulary below
(never a key, an address or a user).

The pipeline modules call these objects through ``events.py`` (a notification's state
changes) or directly (relay passes, SMTP connections, leases); they never build one.
Gauges are not here: they are read from the database and the broker when the web
process's ``/metrics`` is scraped (``exposition.py``), so no worker queries for them.

A Celery prefork worker runs its tasks in pool processes, so their counts live in
those processes. With ``PROMETHEUS_MULTIPROC_DIR`` set (before the process starts),
prometheus-client keeps every process's values in files in that directory, and the
exposition server in the worker's main process adds them up; see ``exposition.py``.
"""

from __future__ import annotations

import os

# prometheus-client picks multiprocess mode, and opens its files in the directory, when
# the first metric is built: the directory must exist before that.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import Counter, Histogram, disable_created_metrics  # noqa: E402

# No ``*_created`` series beside each counter: they double the series and mean little for
# process-lifetime counters (multiprocess mode never has them).
disable_created_metrics()

# The label vocabularies. Anything else is reported as "other", so a label can never
# take an unbounded value.
OUTCOMES = (
    "sent",  # the mail server accepted it, recorded
    "duplicate",  # a redelivery of a key already finished: skipped
    "retried",  # an attempt failed transiently; released for a retry after a backoff
    "deferred",  # released untried (mail server unreachable, time budget, lease in doubt)
    "busy",  # another worker holds the key; tried again later
    "failed",  # ended failed (see notifications_failures_total for why)
    "held",  # ambiguous, held for a person (NOTIFICATIONS_AMBIGUOUS = "hold")
    "claim_lost",  # taken over by another worker before its outcome was recorded
    "expired",  # its expires_at passed before it could be sent: never sent
    "cancelled",  # a delivery found it cancelled: skipped
)
FAILURE_REASONS = (
    "rejected",  # a permanent (5xx) reply from the mail server
    "attempts_exhausted",  # NOTIFICATIONS_MAX_ATTEMPTS attempts without success
    "unreachable_too_long",  # no mail server reached for NOTIFICATIONS_GIVE_UP_AFTER seconds
    "oversized",  # too large for a broker message
    "undecodable",  # its message could not be decoded
    "crashed_worker",  # its message crashed the worker up to the delivery limit
    "could_not_build",  # the email could not be built
    "dead_lettered",  # a worker refused its message (see the worker's log)
    "other",
)
AMBIGUOUS_ACTIONS = ("resend", "hold", "fail")
BATCH_RETRY_CAUSES = ("database", "redis", "broker", "time_limit", "other")
SMTP_RESULTS = ("opened", "failed")

# Seconds, from a commit to the mail server's acceptance: a local relay takes tens of
# milliseconds, an outage or a retry backoff minutes, a hold for a person hours.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 500, 1000, 5000)

# Calling services: notify() and notify_many().
CREATED = Counter(
    "notifications_created_total", "Notifications created by notify(), counted once their transaction commits."
)
DEDUPE_HITS = Counter(
    "notifications_dedupe_hits_total",
    "notify() items whose key already had a notification: the existing one was returned, nothing written.",
)

# The relay.
PUBLISHED = Counter(
    "notifications_published_total",
    "Outbox rows published: confirmed by the broker and marked published, counted after the commit.",
)
MESSAGES_PUBLISHED = Counter(
    "notifications_messages_published_total", "Delivery messages the broker confirmed (each carries a batch)."
)
RELAY_PASS_SECONDS = Histogram(
    "notifications_relay_pass_seconds", "Duration of one relay pass over the outbox.", buckets=PASS_BUCKETS
)
RELAY_PASS_ROWS = Histogram(
    "notifications_relay_pass_rows", "Outbox rows one relay pass published.", buckets=ROW_BUCKETS
)
RELAY_PASS_FAILURES = Counter(
    "notifications_relay_pass_failures_total", "Relay passes that failed (database or broker away)."
)
CANCELLED = Counter(
    "notifications_cancelled_total",
    "cancel() calls that stopped a notification, by whether it was in time (nothing sent) or not.",
    ["in_time"],
)
RATE_LIMIT_WAITS = Counter(
    "notifications_rate_limit_wait_seconds_total",
    "Seconds sending threads waited for an email backend's rate limit, by backend.",
    ["backend"],
)
RECOVERED = Counter(
    "notifications_recovered_total", "Notifications recovery gave a new message (stalled claim, lost message)."
)

# Delivery.
DELIVERIES = Counter(
    "notifications_deliveries_total",
    "What each delivery of a notification ended with, counted once the outcome is committed.",
    ["outcome"],
)
FAILURES = Counter(
    "notifications_failures_total", "Notifications that ended failed, by why (bounded vocabulary).", ["reason"]
)
AMBIGUOUS = Counter(
    "notifications_ambiguous_total",
    "Sends whose outcome is unknown (the connection failed after the email was handed over, or its worker died "
    "mid-send), by what was done: resend, hold for a person, or fail (no attempts left).",
    ["action"],
)
LATENCY = Histogram(
    "notifications_delivery_latency_seconds",
    "Seconds from a notification's commit (its created_at) to the mail server's acceptance.",
    buckets=LATENCY_BUCKETS,
)
TAKEOVERS = Counter("notifications_claim_takeovers_total", "Claims taken over from a holder whose lease had run out.")
CLAIMS_LOST = Counter(
    "notifications_claims_lost_total", "Claims a worker's lease renewal found taken over or settled elsewhere."
)
RENEWAL_FAILURES = Counter(
    "notifications_lease_renewal_failures_total", "Lease renewal rounds that could not reach the database."
)
BATCH_RETRIES = Counter(
    "notifications_delivery_batch_retries_total",
    "Delivery messages retried whole after an infrastructure error, nothing sent, by cause.",
    ["cause"],
)
BATCHES_SPLIT = Counter(
    "notifications_batches_split_total", "Redelivered batch messages split into one message per notification."
)
SANDBOX_CRASHES = Counter(
    "notifications_sandbox_crashes_total",
    "Replayed Kafka messages whose delivery process died (a crash the consumer survived and counted).",
)
UNDECODABLE = Counter(
    "notifications_undecodable_messages_total", "Messages a worker could not decode, rejected to the dead letters."
)
PARKED = Counter("notifications_parked_total", "Dead letters that carried no notification, moved to the parked queue.")

# The mail server.
SMTP_CONNECTIONS = Counter(
    "notifications_smtp_connections_total", "Connections to the mail server opened, or that failed to open.", ["result"]
)
SMTP_RECONNECTS = Counter(
    "notifications_smtp_reconnects_total",
    "Connections opened by a sending thread that had one before (dropped after an error, or found closed).",
)
SMTP_REUSES = Counter(
    "notifications_smtp_connection_reuses_total", "Emails handed over a connection that had carried one before."
)

# Children resolved once, for every label value: an increment on the delivery path is one
# dictionary lookup, and every series exists (at 0) from the start, so rate() sees its rise.
deliveries = {outcome: DELIVERIES.labels(outcome) for outcome in OUTCOMES}
failures = {reason: FAILURES.labels(reason) for reason in FAILURE_REASONS}
ambiguous = {action: AMBIGUOUS.labels(action) for action in AMBIGUOUS_ACTIONS}
batch_retries = {cause: BATCH_RETRIES.labels(cause) for cause in BATCH_RETRY_CAUSES}
smtp_connections = {result: SMTP_CONNECTIONS.labels(result) for result in SMTP_RESULTS}
cancelled = {flag: CANCELLED.labels(flag) for flag in ("true", "false")}


def multiprocess_dir() -> str | None:
    """The multiprocess directory of this process, or None (one process, one registry)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
