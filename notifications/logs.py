"""A JSON log formatter: one object per line, for any service's ``LOGGING``.

::

    "formatters": {"json": {"()": "notifications.logs.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``message``, ``host`` and ``pid``, then every attribute the call passed in ``extra``
(the pipeline's ``notifications.events`` lines carry ``event``, ``key``,
``notification_id``, ``attempt``, ``worker``, ``latency_seconds``, ``reason``...), and
``exc_info`` / ``stack_info`` as text when present. Values JSON cannot carry are
written as their ``str()``.
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from typing import Any

# What every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "host": self.host,
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in data:
                data[name] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)
