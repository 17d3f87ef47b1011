"""Structured (JSON lines) logs for spicesync processes.

Each line carries the Temporal context the SDK attaches (workflow id, run id, activity type,
attempt) and so the user id (it is in the workflow id); never an email or a name, since no log
call and no error message of spicesync's carries one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "configure_logging"]

# Context dicts the Temporal SDK puts on its log records.
_CONTEXT_KEYS = ("temporal_workflow", "temporal_activity")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, Temporal context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one JSON line."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            context = getattr(record, key, None)
            if isinstance(context, dict):
                entry.update({k: v for k, v in context.items() if isinstance(v, str | int | float)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
