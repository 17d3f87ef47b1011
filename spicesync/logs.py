"""Structured (JSON lines) logs for spicesync processes.

Each line carries the Temporal context the SDK attaches (workflow id, run id, activity type,
attempt) and so the user id (it is in the workflow id); never an email or a name, since no log
call and no error message of spicesync's carries one. The SDK's core (its Rust part) logs
through the same handler once its runtime is built with :func:`sdk_core_logging`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from temporalio.runtime import LogForwardingConfig, LoggingConfig, TelemetryFilter

__all__ = ["SDK_CORE_LOGGER", "JsonFormatter", "configure_logging", "sdk_core_logging"]

# Context dicts the Temporal SDK puts on its log records, and the codec server's access record.
_CONTEXT_KEYS = ("temporal_workflow", "temporal_activity", "http")

# The logger the SDK core's own lines are forwarded to.
SDK_CORE_LOGGER = "temporalio.sdk_core"


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
        core = getattr(record, "temporal_log", None)
        if core is not None:
            for key, value in _core_fields(core).items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _core_fields(core: object) -> dict[str, object]:
    # What the core attaches to a line (workflow type, run id, durations...): ids and numbers.
    fields: dict[str, object] = {"target": getattr(core, "target", "")}
    try:
        extra = dict(getattr(core, "fields", {}))
    except Exception:  # the SDK documents this conversion as fallible
        extra = {}
    for key, value in sorted(extra.items()):
        fields[key] = value if isinstance(value, str | int | float | bool) else str(value)
    return fields


def configure_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def sdk_core_logging(core_level: str = "WARN") -> LoggingConfig:
    """Logging for a Temporal runtime: the core's lines go to Python's logging, not to stderr.

    Left to itself the core writes its warnings (slow workflow tasks, poll errors) straight to
    stderr as ANSI-coloured text. Forwarded, they become records of :data:`SDK_CORE_LOGGER`,
    formatted like every other line; the target and the core's fields become JSON keys.

    Args:
        core_level: The least severe core line kept (``WARN``; ``ERROR`` for a process that
            reports its own calls' failures, so the client's retry warnings are not repeated).
    """
    return LoggingConfig(
        filter=TelemetryFilter(core_level=core_level, other_level="ERROR"),
        forwarding=LogForwardingConfig(
            logger=logging.getLogger(SDK_CORE_LOGGER),
            append_target_to_name=False,
            prepend_target_on_message=False,
            append_log_fields_to_message=False,
        ),
    )
